"""Typed run configuration: schema, YAML + override loading, validation."""
from .load import ConfigError, check_teacher, load_config, to_yaml
from .reference import config_reference
from .schema import Config

__all__ = ["Config", "ConfigError", "check_teacher", "config_reference", "load_config", "to_yaml"]
