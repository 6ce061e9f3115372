"""The one exception type for bad input: what the user can fix, as opposed to a bug in ict_scale.

Raise `UserError` (or a subclass: ConfigError, StorageError, DataError, ...) with a message that names the
key, file or URL and what was expected; the command-line entry points (`ict_scale.cli`) print it as one
line `error: ...` and exit with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input (a config value, a file, a URL, credentials): the message alone tells what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value or key that the schema does not accept, or that does not fit the data or the
    number of processes (raised where that is found: loading, data set-up, process-group start)."""
