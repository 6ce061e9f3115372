"""Shard storage through fsspec: local paths and object stores, opened without a shell.

At import we register an fsspec opener in webdataset's `gopen_schemes` for every remote scheme, so
any process that imports this module (including spawn/forkserver DataLoader workers, which re-import
it) opens s3:// through s3fs. Filesystems are created per process (s3fs is not fork-safe) and never
shared with a parent through fsspec's instance cache.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import time
from typing import Any, Mapping
from urllib.parse import urlparse

from ict_scale.checkpoint.storage import write_whole
from ict_scale.errors import UserError
from ict_scale.urls import url_to_fs

# The module, not the function of the same name that the webdataset package re-exports.
wds_gopen = importlib.import_module("webdataset.gopen")

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https")
# Errors that no retry can fix: the object is absent, access is refused, or the URL is malformed.
FATAL_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)
_FILESYSTEMS: dict[tuple, Any] = {}


class StorageError(UserError, RuntimeError):
    """A shard or manifest could not be read or written; the message names the URL and the cause."""


# botocore's names (matched by name: botocore is only present with s3fs) for causes no retry can fix.
NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound")
UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError")


def describe(e: BaseException, options_key: str = "data.storage_options") -> str:
    """The cause in a few words, saying what to set for the common ones (`options_key`: where the options came from)."""
    name = type(e).__name__
    if name in NO_CREDENTIALS:
        return (f"no credentials ({e}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                f"or key and secret in {options_key}")
    if name in UNREACHABLE:
        return f"endpoint unreachable ({e}); check AWS_ENDPOINT_URL or {options_key}.client_kwargs.endpoint_url"
    if isinstance(e, TypeError):  # an option the filesystem or its client does not take
        return f"{options_key} rejected ({e})"
    return f"{name}: {e}"


def is_fatal(e: BaseException) -> bool:
    """No retry can fix it: absent, refused, malformed, no credentials, or options the client rejects."""
    return isinstance(e, FATAL_ERRORS + (TypeError,)) or type(e).__name__ in NO_CREDENTIALS


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def plain(obj):
    """Deep copy of a mapping (OmegaConf containers included) as plain dicts/lists."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return copy.copy(obj)


def resolve_options(url: str, storage_options: Mapping | None) -> dict:
    """fsspec options for `url`: the given ones, plus an S3 endpoint from AWS_ENDPOINT_URL[_S3] if unset."""
    opts = plain(storage_options or {})
    if protocol_of(url) in ("s3", "s3a"):
        client = opts.setdefault("client_kwargs", {})
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in client and "endpoint_url" not in opts:
            client["endpoint_url"] = endpoint
        # Bounded botocore retries so an unreachable endpoint fails in seconds, not minutes;
        # longer outages are handled by our own backoff around whole-shard reads.
        opts.setdefault("config_kwargs", {}).setdefault("connect_timeout", 10)
        opts["config_kwargs"].setdefault("retries", {"total_max_attempts": 3, "mode": "standard"})
    return opts


def filesystem(url: str, storage_options: Mapping | None = None):
    """(fsspec filesystem, path) for `url`, created once per process and options."""
    opts = resolve_options(url, storage_options)
    key = (os.getpid(), protocol_of(url), json.dumps(opts, sort_keys=True, default=str))
    if key not in _FILESYSTEMS:
        fs, _ = url_to_fs(url, opts, skip_instance_cache=True)
        _FILESYSTEMS[key] = fs
    fs = _FILESYSTEMS[key]
    return fs, fs._strip_protocol(url)


def open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, storage_options: Mapping | None = None):
    """webdataset gopen handler: open `url` with this process's fsspec filesystem."""
    fs, path = filesystem(url, storage_options)
    return fs.open(path, mode)


for _scheme in REMOTE_SCHEMES:
    wds_gopen.gopen_schemes[_scheme] = open_with_fsspec


def is_pipe(url: str) -> bool:
    """Whether webdataset would run `url` as a shell command. It picks the handler by urlparse's scheme,
    which ignores case, leading blanks and tabs or newlines anywhere, so 'PIPE:cmd' is a pipe too."""
    try:
        scheme = urlparse(url).scheme
    except ValueError:  # a malformed host part; judge by the prefix alone
        scheme = ""
    return scheme == "pipe" or url.lstrip().lower().startswith("pipe:")


def check_url_allowed(url: str, allow_pipe: bool) -> None:
    """Refuse URLs that would run a shell command (also after webdataset's GOPEN_REWRITE rules).

    A plain `if`, not an assert: under `python -O` webdataset's own assert in its pipe handler is gone."""
    for candidate in (url, wds_gopen.rewrite_url(url)):
        if is_pipe(candidate) and not allow_pipe:
            raise StorageError(f"{url}: refused a 'pipe:' URL (it runs a shell command); "
                               "set data.allow_pipe=true only for trusted shard lists")


def read_bytes(url: str, storage_options: Mapping | None = None, *, allow_pipe: bool = False,
               retries: int = 5, backoff_s: float = 0.5) -> bytes:
    """The whole object at `url`, retrying transient errors with exponential backoff."""
    check_url_allowed(url, allow_pipe)
    for attempt in range(max(1, retries)):
        try:
            if protocol_of(url) in REMOTE_SCHEMES:
                fs, path = filesystem(url, storage_options)
                # One GET: s3fs would otherwise ask for the size first to split big objects into ranges.
                one_request = {"max_concurrency": 1} if protocol_of(url) in ("s3", "s3a") else {}
                return fs.cat_file(path, **one_request)
            with wds_gopen.gopen(url, "rb") as stream:  # local files, and pipe: once allowed
                return stream.read()
        except Exception as e:  # network resets, timeouts, 5xx: worth another try; the rest is fatal
            if is_fatal(e):
                raise StorageError(f"{url}: cannot read ({describe(e)})") from e
            last = e
            if attempt + 1 < retries:
                time.sleep(backoff_s * 2 ** attempt)
    attempts = f"{retries} attempts" if retries > 1 else "1 attempt"
    raise StorageError(f"{url}: giving up after {attempts} ({describe(last)})") from last


def list_sizes(dir_url: str, storage_options: Mapping | None = None) -> dict[str, int]:
    """{file name: byte size} of the objects directly under `dir_url`; fails fast with the cause."""
    try:
        fs, path = filesystem(dir_url, storage_options)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError as e:
        raise StorageError(f"{dir_url}: not found ({describe(e)})") from e
    except PermissionError as e:
        raise StorageError(f"{dir_url}: access denied ({describe(e)})") from e
    except Exception as e:
        raise StorageError(f"{dir_url}: cannot reach storage ({describe(e)})") from e
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") != "directory"}


def write_atomic(url: str, data: bytes, storage_options: Mapping | None = None) -> None:
    """Write `data` so that readers see either nothing or all of it (temp + rename, or one whole upload)."""
    fs, path = filesystem(url, storage_options)
    write_whole(fs, path, data)


def join(base: str, name: str) -> str:
    """`base/name` for local paths and URLs alike (no Path: it would mangle 's3://')."""
    return base.rstrip("/") + "/" + name
