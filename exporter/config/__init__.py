"""The one config model: YAML validated by config.schema.json, merged over defaults.yaml."""

from exporter.config.loader import (
    DEFAULTS_PATH,
    SCHEMA_PATH,
    Config,
    ConfigError,
    load_config,
    load_schema,
    merge_headers,
    parse_duration,
    parse_headers,
    read_secret,
)

__all__ = [
    "DEFAULTS_PATH",
    "SCHEMA_PATH",
    "Config",
    "ConfigError",
    "load_config",
    "load_schema",
    "merge_headers",
    "parse_duration",
    "parse_headers",
    "read_secret",
]
