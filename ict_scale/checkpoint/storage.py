"""Bytes in a run directory, local or on object storage, through fsspec. Paths stay `str` (s3:// survives)."""
from __future__ import annotations

import io
import json
import math
import os
import uuid

import fsspec.implementations.local

from ict_scale.urls import url_to_fs


class Storage:
    """A root URL plus the fsspec options to reach it; every write is atomic."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root.rstrip("/")
        self.fs, self.base = url_to_fs(self.root, storage_options)
        self.storage_options = dict(storage_options or {})
        self.is_local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def makedirs(self, rel: str = "") -> None:
        if self.is_local:
            self.fs.makedirs(self._path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_whole(self.fs, self._path(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under `rel`; empty when it does not exist."""
        try:
            entries = self.fs.ls(self._path(rel), detail=False, refresh=True) if not self.is_local \
                else self.fs.ls(self._path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove(self, rel: str) -> None:
        if self.fs.exists(self._path(rel)):
            self.fs.rm(self._path(rel), recursive=True)

    def append_line(self, rel: str, line: str) -> None:
        """Append one line: in place locally; object stores have no append, so the object is rewritten."""
        path = self._path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(line.rstrip("\n") + "\n")
            return
        old = self.fs.cat_file(path) if self.fs.exists(path) else b""
        self.fs.pipe_file(path, old + line.rstrip("\n").encode() + b"\n")

    def append_record(self, rel: str, record: dict) -> None:
        """Append `record` as one line of strict JSON (see `strict_json`)."""
        self.append_line(rel, strict_json(record))


def _finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, **kwargs) -> str:
    """JSON that strict readers accept: a non-finite float (a diverged loss) becomes null, never a bare NaN/Infinity."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def write_whole(fs, path: str, data: bytes) -> None:
    """Readers see nothing or all of `data`: a temporary name then rename locally, one PUT on object stores."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # an object store publishes an object only once it is complete


def torch_bytes(obj) -> bytes:
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
