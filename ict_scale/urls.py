"""Where a URL (local path, file://, s3://, any fsspec protocol) becomes a filesystem: the one place.

Paths stay `str` throughout (pathlib would turn s3://bucket into s3:/bucket). Data, checkpoints, run directories
and evaluation files all reach storage through `url_to_fs`, so options (endpoint, credentials) mean the same
everywhere.
"""
from __future__ import annotations

from typing import Any, Mapping

import fsspec


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None, **kwargs) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; `kwargs` go to fsspec (e.g. skip_instance_cache)."""
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}), **kwargs)


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None):
    """A file object for `url` (use it as a context manager)."""
    fs, path = url_to_fs(url, storage_options)
    return fs.open(path, mode)
