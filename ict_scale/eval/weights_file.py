"""Reading a feature network's weight file (local path, s3:// or any fsspec URL) and checking its sha256."""
from __future__ import annotations

import hashlib

from ict_scale.urls import open_url


def read_verified(url: str, sha256: str | None, storage_options: dict | None, error: type[Exception],
                  what: str, hint: str) -> tuple[bytes, str]:
    """(bytes, sha256 hex) of the file at `url`; `error` names it and `hint` says how to get the right one."""
    try:
        with open_url(url, "rb", storage_options) as f:
            data = f.read()
    except FileNotFoundError as err:
        raise error(f"{what} not found at {url!r}: {hint}") from err
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256.lower():
        raise error(f"{what} at {url!r} have sha256 {digest}, expected {sha256} ({len(data):,} bytes read): "
                    f"wrong or damaged file; {hint}")
    return data, digest
