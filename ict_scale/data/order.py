"""The global sample order: a world-size-independent map from a global position to (shard, member).

Position p lies in epoch e = p // N (N = samples per epoch). Epoch e lays the shards out in a
permutation seeded from (seed, e); inside each shard the members follow a permutation seeded from
(seed, e, shard). Global batch k of a run with global batch B covers positions [p0 + kB, p0 + (k+1)B)
and rank r takes the contiguous slice r of it, so the order never depends on ranks or workers.
Permutations come from an integer hash and a stable argsort: identical on every host and version.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from ict_scale.data.synthetic import uniform


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes, hosts and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_permutation(n: int, key: int) -> np.ndarray:
    """A permutation of range(n) determined by `key` alone (argsort of hashed uniforms)."""
    u = uniform(torch.arange(n, dtype=torch.int64), key, 0).numpy()
    return np.argsort(u, kind="stable")


def flip_mask(positions: np.ndarray, seed: int) -> torch.Tensor:
    """Horizontal-flip decisions (bool) for global positions: a fair coin per (seed, position)."""
    return uniform(torch.from_numpy(positions), derive_seed(seed, "hflip"), 0) < 0.5


def rank_positions(start: int, batch_index: int, batch_per_rank: int, rank: int, world_size: int) -> np.ndarray:
    """Global positions of rank `rank`'s slice of global batch `batch_index` counted from `start`."""
    first = start + (batch_index * world_size + rank) * batch_per_rank
    return np.arange(first, first + batch_per_rank, dtype=np.int64)


class GlobalOrder:
    """Maps global positions to (shard index, member index) for a fixed list of shard sizes."""

    def __init__(self, shard_sizes: list[int], seed: int, shuffle: bool = True):
        if not shard_sizes or min(shard_sizes) <= 0:
            raise ValueError(f"every shard needs at least one sample, got sizes {shard_sizes[:8]}...")
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.epoch_size = int(self.shard_sizes.sum())
        self.seed, self.shuffle = seed, shuffle
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._members: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, start position of each permuted shard) for `epoch` (small LRU cache)."""
        if epoch not in self._epochs:
            n = len(self.shard_sizes)
            perm = seeded_permutation(n, derive_seed(self.seed, "shards", epoch)) if self.shuffle else np.arange(n)
            starts = np.concatenate([[0], np.cumsum(self.shard_sizes[perm])[:-1]])
            self._epochs[epoch] = (perm, starts)
            if len(self._epochs) > 2:  # a batch spans at most two epochs
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def member_order(self, epoch: int, shard: int) -> np.ndarray:
        """The order in which `shard`'s members are visited in `epoch`."""
        key = (epoch, shard)
        if key not in self._members:
            n = int(self.shard_sizes[shard])
            self._members[key] = (seeded_permutation(n, derive_seed(self.seed, "members", epoch, shard))
                                  if self.shuffle else np.arange(n))
            if len(self._members) > 256:
                self._members.popitem(last=False)
        return self._members[key]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, shard, member) arrays for an int64 array of global positions."""
        epochs, offsets = np.divmod(positions, self.epoch_size)
        shards = np.empty_like(positions)
        members = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            perm, starts = self._epoch_layout(int(epoch))
            slot = np.searchsorted(starts, offsets[sel], side="right") - 1
            shards[sel] = perm[slot]
            within = offsets[sel] - starts[slot]
            members[sel] = [self.member_order(int(epoch), int(s))[i] for s, i in zip(perm[slot], within)]
        return epochs, shards, members
