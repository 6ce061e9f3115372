"""Typed run configuration: schema, YAML + override loading, validation."""
from .load import ConfigError, load_config, to_yaml
from .schema import Config

__all__ = ["Config", "ConfigError", "load_config", "to_yaml"]
