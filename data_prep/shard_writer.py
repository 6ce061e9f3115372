"""Building one shard: PNG-encode its samples, pack a byte-reproducible tar, publish it atomically."""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ict_scale.data import storage
from ict_scale.data.manifest import ShardEntry


@dataclass
class ShardJob:
    """Everything a worker process needs to (re)build shard `name` under `out`."""
    name: str
    keys: list[str]
    payload: object                   # has .render() -> iterator of (HWC uint8, label or None)
    out: str
    storage_options: dict
    expected: ShardEntry | None = None  # from an earlier run: skip if the stored shard still matches


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata (mtime 0, no owner) so the same samples always give the same sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def stored_matches(url: str, expected: ShardEntry, storage_options: dict) -> bool:
    """Whether the object at `url` is exactly the shard an earlier run recorded."""
    try:
        data = storage.read_bytes(url, storage_options, retries=2)
    except storage.StorageError:
        return False
    return len(data) == expected.bytes and hashlib.sha256(data).hexdigest() == expected.sha256


def build_shard(job: ShardJob) -> tuple[ShardEntry, bool]:
    """(manifest entry, reused) for one shard; runs in a worker process."""
    url = storage.join(job.out, job.name)
    if job.expected is not None and stored_matches(url, job.expected, job.storage_options):
        return job.expected, True
    members = []
    for key, (image, label) in zip(job.keys, job.payload.render(), strict=True):
        members.append((f"{key}.png", encode_png(image)))
        if label is not None:
            members.append((f"{key}.cls", str(label).encode("ascii")))
    data = tar_bytes(members)
    storage.write_atomic(url, data, job.storage_options)
    return ShardEntry(job.name, len(job.keys), len(data), hashlib.sha256(data).hexdigest()), False
