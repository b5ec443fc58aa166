"""The data contract between the stages (schema v2). Imports nothing from `pipeline` or `stages`."""
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1 (float32 arrays, PNG/WebP, metadata as an object) is still read
