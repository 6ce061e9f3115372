"""Turning a `data.source` string into a list of shard URLs with sample counts (a ShardSet)."""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

import braceexpand

from ict_scale.data import storage
from ict_scale.data.manifest import MANIFEST_NAME, Manifest
from ict_scale.data.samples import parse_tar

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    """Shard URLs in canonical order with their sample counts; shape/classes when a manifest says so."""
    urls: list[str]
    sizes: list[int]
    byte_sizes: list[int] | None = None   # from the manifest, to detect changed shards
    sha256s: list[str] | None = None      # from the manifest: each shard is checked as it is read
    image_shape: list[int] | None = None
    num_classes: int | None = None

    @property
    def fingerprint(self) -> str:
        """Identity of the sample set (names and counts, not locations: a moved copy resumes)."""
        names = [(u.rsplit("/", 1)[-1], n) for u, n in zip(self.urls, self.sizes)]
        return hashlib.sha256(repr(names).encode()).hexdigest()[:16]


def dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def load_manifest(url: str, storage_options: Mapping | None, allow_pipe: bool = False) -> Manifest:
    # One attempt of ours: botocore's own bounded retries cover a blip at start-up, and an unreachable
    # endpoint or a wrong URL then fails in seconds.
    text = storage.read_bytes(url, storage_options, allow_pipe=allow_pipe, retries=1).decode("utf-8")
    return Manifest.from_json(text, url)


def from_manifest(url: str, storage_options: Mapping | None) -> ShardSet:
    manifest = load_manifest(url, storage_options)
    base = dirname(url)
    return ShardSet(urls=[storage.join(base, s.name) for s in manifest.shards],
                    sizes=[s.num_samples for s in manifest.shards],
                    byte_sizes=[s.bytes for s in manifest.shards],
                    sha256s=[s.sha256 for s in manifest.shards],
                    image_shape=manifest.image_shape, num_classes=manifest.num_classes)


def count_by_scanning(urls: list[str], storage_options: Mapping | None, allow_pipe: bool) -> list[int]:
    """Sample counts by reading every shard once (no manifest): correct but slow for big sets."""
    log.warning("no %s beside the shards: counting samples by reading all %d shards", MANIFEST_NAME, len(urls))
    sizes = []
    for url in urls:
        parsed = parse_tar(storage.read_bytes(url, storage_options, allow_pipe=allow_pipe))
        if parsed.error or not parsed.samples:
            raise storage.StorageError(f"{url}: unreadable shard while counting samples ({parsed.error or 'empty'})")
        sizes.append(len(parsed.samples))
    return sizes


def from_urls(urls: list[str], storage_options: Mapping | None, allow_pipe: bool) -> ShardSet:
    """Shards named explicitly: counts from a manifest in their directory if there is one."""
    base = dirname(urls[0])
    if not storage.is_pipe(urls[0]) and all(dirname(u) == base for u in urls):
        fs, path = storage.filesystem(storage.join(base, MANIFEST_NAME), storage_options)
        if fs.exists(path):
            full = from_manifest(storage.join(base, MANIFEST_NAME), storage_options)
            index = {u: i for i, u in enumerate(full.urls)}
            missing = [u for u in urls if u not in index]
            if missing:
                raise ValueError(f"{base}/{MANIFEST_NAME} does not list {missing[:3]} (of {len(missing)} shards)")
            pick = [index[u] for u in urls]
            return ShardSet([full.urls[i] for i in pick], [full.sizes[i] for i in pick],
                            [full.byte_sizes[i] for i in pick], [full.sha256s[i] for i in pick],
                            full.image_shape, full.num_classes)
    return ShardSet(urls, count_by_scanning(urls, storage_options, allow_pipe))


def resolve(source: str, storage_options: Mapping | None = None, allow_pipe: bool = False) -> ShardSet:
    """manifest.json URL | brace pattern | single .tar | directory of shards -> ShardSet."""
    storage.check_url_allowed(source, allow_pipe)
    if source.endswith(".json"):
        return from_manifest(source, storage_options)
    if "{" in source or source.endswith(".tar"):
        return from_urls(list(braceexpand.braceexpand(source)), storage_options, allow_pipe)
    manifest_url = storage.join(source, MANIFEST_NAME)
    fs, path = storage.filesystem(manifest_url, storage_options)
    if fs.exists(path):
        return from_manifest(manifest_url, storage_options)
    names = sorted(n for n in storage.list_sizes(source, storage_options) if n.endswith(".tar"))
    if not names:
        raise FileNotFoundError(f"{source}: no {MANIFEST_NAME} and no .tar shards")
    return from_urls([storage.join(source, n) for n in names], storage_options, allow_pipe)


def verify_sha256(url: str, data: bytes, expected: str) -> None:
    """Refuse shard bytes whose sha256 is not the manifest's: a shard swapped for another of the same size
    would otherwise pass the size check and silently change which samples an epoch holds."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise storage.StorageError(f"{url}: sha256 {actual}, manifest says {expected} (shard changed since the "
                                   "manifest was written, or the manifest is wrong)")


def check_present(shards: ShardSet, storage_options: Mapping | None) -> None:
    """Fail fast if a shard is missing or its size differs from the manifest (one listing per directory)."""
    by_dir: dict[str, list[int]] = defaultdict(list)
    for i, url in enumerate(shards.urls):
        if storage.protocol_of(url) in ("http", "https") or storage.is_pipe(url):
            continue  # no listing for these: a missing shard fails when first read
        by_dir[dirname(url)].append(i)
    for directory, indices in by_dir.items():
        listed = storage.list_sizes(directory, storage_options)
        for i in indices:
            name = shards.urls[i].rsplit("/", 1)[-1]
            if name not in listed:
                raise storage.StorageError(f"{shards.urls[i]}: shard not found (listed {directory})")
            if shards.byte_sizes is not None and listed[name] != shards.byte_sizes[i]:
                raise storage.StorageError(f"{shards.urls[i]}: {listed[name]} bytes, manifest says "
                                           f"{shards.byte_sizes[i]} (shard changed since the manifest was written)")
