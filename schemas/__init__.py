"""The data contract between the stages (schema v1). Imports nothing from `pipeline` or `stages`."""
SCHEMA_VERSION = 1
