"""One exception type for everything a user can fix; the CLI prints it as a single line, no traceback."""


class GdroError(Exception):
    """A user error (bad config, bad input file, missing weights): the message says what and what to do."""
