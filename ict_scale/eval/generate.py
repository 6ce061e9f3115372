"""Samples for evaluation: which global indices a rank draws, and each sample's noise from its own seed.

Sample i's class label, initial noise z and re-noise come from a generator keyed by (seed, i) alone,
so the set of samples - and hence the FID - is the same on 1 or N processes and for any batch size.
Rank r of W takes the contiguous block [floor(N r / W), floor(N (r + 1) / W)): disjoint, covering
[0, N) exactly, sizes differing by at most one; nothing is padded or drawn twice. The noise levels and the
sampler are ict.sampling's (`sampling_sigmas`, `generate_uint8`), as for grids and the sample command.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def rank_indices(num: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of the global sample indices [0, num)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return range(num * rank // world_size, num * (rank + 1) // world_size)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """Sample `index`'s own generator: PCG64 keyed by the SeedSequence of the pair (seed, index).

    Not torch.Generator: its CPU engine (mt19937) keeps only the low 32 bits of a seed, so (seed, index)
    pairs could not all get distinct streams; SeedSequence hashes the whole pair.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"need seed >= 0 and index >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index)])


def sample_inputs(indices: Sequence[int], shape: tuple[int, ...], seed: int, num_classes: int, num_renoise: int):
    """(z, renoise list, labels or None) on the CPU for the given global indices.

    Per sample the draws are, in order: label (conditional models only), z, then one re-noise tensor per
    step after the first. z is drawn before the re-noise, so a sample's one-step image does not depend on
    how many steps are also evaluated.
    """
    n = len(indices)
    z = np.empty((n, *shape), dtype=np.float32)
    renoise = [np.empty((n, *shape), dtype=np.float32) for _ in range(num_renoise)]
    labels = np.empty(n, dtype=np.int64) if num_classes > 0 else None
    for row, index in enumerate(indices):
        rng = sample_rng(seed, index)
        if labels is not None:
            labels[row] = rng.integers(num_classes)
        z[row] = rng.standard_normal(shape, dtype=np.float32)
        for r in renoise:
            r[row] = rng.standard_normal(shape, dtype=np.float32)
    as_torch = torch.from_numpy
    return as_torch(z), [as_torch(r) for r in renoise], (as_torch(labels) if labels is not None else None)
