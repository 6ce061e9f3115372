"""Producers turn batches of global positions into decoded (images, labels) batches inside one worker.

A producer is a small picklable description; its heavy parts (thread pool, filesystems) are built
in the process that iterates it, because DataLoader workers must not inherit them from the parent.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ict_scale.data import storage
from ict_scale.data.order import GlobalOrder
from ict_scale.data.samples import SKIP_REASONS, ParsedShard, SkipSample, decode_image, parse_tar, read_label
from ict_scale.data.sources import ShardSet, verify_sha256
from ict_scale.data.synthetic import synthetic_images
from ict_scale.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


class DataError(UserError, RuntimeError):
    """The data are unusable (too many bad samples, or a shard with none usable)."""


@dataclass
class SyntheticProducer:
    """Global position p -> synthetic_images([p]): an infinite procedural data set."""
    resolution: int
    num_classes: int           # of the data set; labels are delivered only if use_labels
    use_labels: bool
    seed: int
    skips: dict = field(default_factory=dict)

    def run(self, plans: Iterator[np.ndarray]) -> Iterator[Batch]:
        for positions in plans:
            images, labels = synthetic_images(torch.from_numpy(positions), self.seed, self.resolution,
                                              max(1, self.num_classes))
            yield images, labels if self.use_labels else torch.zeros_like(labels)


@dataclass
class ShardProducer:
    """Positions -> (shard, member) via the global order; shards fetched ahead by a thread pool."""
    shards: ShardSet
    order_seed: int
    shuffle: bool
    resolution: int
    num_classes: int
    use_labels: bool
    storage_options: dict
    allow_pipe: bool = False
    prefetch_shards: int = 4
    io_retries: int = 5
    io_backoff_s: float = 0.5
    max_skip_rate: float = 0.01
    min_samples_for_skip_rate: int = 1000
    skips: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    samples_read: int = 0

    def run(self, plans: Iterator[np.ndarray]) -> Iterator[Batch]:
        # Counters start at zero for every stream (the loader adds up finished streams itself).
        self.skips, self.samples_read = dict.fromkeys(SKIP_REASONS, 0), 0
        self._order = GlobalOrder(self.shards.sizes, self.order_seed, self.shuffle)
        with ThreadPoolExecutor(max(1, self.prefetch_shards), thread_name_prefix="shard-fetch") as pool:
            self._pool = pool
            self._cache: OrderedDict[int, Future] = OrderedDict()
            self._refs: dict[int, int] = {}
            pending: deque = deque()
            plans = iter(plans)
            while True:
                # Plan ahead until `prefetch_shards` shards (or as many batches) are in flight, so
                # downloads overlap decoding; the batch bound matters when few shards are reused often.
                while not pending or (len(self._refs) < self.prefetch_shards and len(pending) < self.prefetch_shards):
                    positions = next(plans)
                    located = self._order.locate(positions)
                    for s in np.unique(located[1]).tolist():
                        self._request(s)
                    pending.append((positions, located))
                positions, located = pending.popleft()
                yield self._assemble(positions, *located)
                for s in np.unique(located[1]).tolist():
                    self._release(s)

    def _request(self, shard: int) -> None:
        if shard not in self._cache:
            self._cache[shard] = self._pool.submit(self._load, shard)
        self._cache.move_to_end(shard)
        self._refs[shard] = self._refs.get(shard, 0) + 1

    def _release(self, shard: int) -> None:
        self._refs[shard] -= 1
        if self._refs[shard] == 0:
            del self._refs[shard]
        # Keep a few released shards: with large shards the same worker returns to them soon.
        unused = [s for s in self._cache if s not in self._refs]
        for s in unused[: max(0, len(unused) - self.prefetch_shards)]:
            del self._cache[s]

    def _load(self, shard: int) -> ParsedShard:
        url = self.shards.urls[shard]
        data = storage.read_bytes(url, self.storage_options, allow_pipe=self.allow_pipe,
                                  retries=self.io_retries, backoff_s=self.io_backoff_s)
        if self.shards.sha256s is not None:  # about 1% of the time PNG decoding takes (BENCHMARKS.md)
            verify_sha256(url, data, self.shards.sha256s[shard])
        return parse_tar(data)

    def _decode(self, parsed: ParsedShard, member: int) -> tuple[np.ndarray, int]:
        if member >= len(parsed.samples):
            raise SkipSample("corrupt_tar", parsed.error or f"tar holds only {len(parsed.samples)} samples")
        sample = parsed.samples[member]
        image = decode_image(sample, self.resolution)
        return image, (read_label(sample, self.num_classes) if self.use_labels else 0)

    def _substitute(self, epoch: int, shard: int, member: int, parsed: ParsedShard) -> tuple[np.ndarray, int]:
        """The next usable member of the same shard in this epoch's member order (deterministic)."""
        visit = self._order.member_order(epoch, shard)
        start = int(np.flatnonzero(visit == member)[0])
        for step in range(1, len(visit)):
            try:
                return self._decode(parsed, int(visit[(start + step) % len(visit)]))
            except SkipSample:
                continue
        raise DataError(f"{self.shards.urls[shard]}: no usable sample in this shard "
                        f"({parsed.error or 'every member was rejected'}); rebuild or remove it")

    def _assemble(self, positions, epochs, shards, members) -> Batch:
        images = np.empty((len(positions), 3, self.resolution, self.resolution), dtype=np.uint8)
        labels = np.zeros(len(positions), dtype=np.int64)
        for i, (e, s, m) in enumerate(zip(epochs.tolist(), shards.tolist(), members.tolist())):
            parsed = self._cache[s].result()  # raises the shard's StorageError, naming its URL
            try:
                image, labels[i] = self._decode(parsed, m)
            except SkipSample as bad:
                self.skips[bad.reason] += 1
                self._last_skip = f"{self.shards.urls[s]} member {m}: {bad}"
                image, labels[i] = self._substitute(e, s, m, parsed)
            images[i] = image.transpose(2, 0, 1)  # HWC -> CHW while copying into the batch
        self.samples_read += len(positions)
        self._check_skip_rate()
        return torch.from_numpy(images), torch.from_numpy(labels)

    def _check_skip_rate(self) -> None:
        skipped = sum(self.skips.values())
        if self.samples_read >= self.min_samples_for_skip_rate and skipped > self.max_skip_rate * self.samples_read:
            raise DataError(f"skipped {skipped} of {self.samples_read} samples "
                            f"({skipped / self.samples_read:.2%} > data.max_skip_rate={self.max_skip_rate:.2%}); "
                            f"by reason {{{', '.join(f'{k}: {v}' for k, v in self.skips.items() if v)}}}; "
                            f"last: {self._last_skip}")
