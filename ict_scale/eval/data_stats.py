"""Reference statistics of a data set, through the same feature pipeline and reduction as generated samples.

The images come from the training loader in its unshuffled, unflipped global order: rank r's j-th batch
holds positions [(j W + r) B, (j W + r + 1) B) (`ict_scale.data.order.rank_positions`), so the first `num`
positions are each read by exactly one rank, and rows at positions >= num are dropped.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ict_scale.data.order import rank_positions
from ict_scale.parallel import comm

from .features import feature_dim_of
from .frechet import FeatureMoments, all_reduce_moments

STATS_FORMAT = "ict_scale.ref_stats/1"


def loader_moments(loader, features, num: int, keep_features: bool = False):
    """This rank's FeatureMoments of positions [0, num) of `loader` (fresh, unshuffled), and its kept features."""
    moments, kept = FeatureMoments(feature_dim_of(features.protocol), features.device), []
    j = 0
    while True:
        positions = rank_positions(0, j, loader.batch_per_rank, loader.rank, loader.world_size)
        if positions[0] >= num:
            break
        images, _ = next(loader)
        f = features(images[torch.from_numpy(positions < num)])
        moments.add(f)
        if keep_features:
            kept.append(f.cpu())
        j += 1
    return moments, kept


def dataset_statistics(loader, features, num: int, source: dict, keep_features: bool = False):
    """(mu, sigma, meta, features or None) of the first `num` images, summed over all ranks with one all-reduce.

    Every rank gets the same result. `source` (what was read) is recorded in meta with the protocol.
    """
    started = time.perf_counter()
    moments, kept = loader_moments(loader, features, num, keep_features)
    all_reduce_moments([moments])
    if int(moments.count) != num:
        raise RuntimeError(f"read {int(moments.count)} images, expected {num}: the loader did not follow its "
                           f"global order")
    mu, sigma = moments.mean_cov()
    gathered = None
    if keep_features:
        parts = comm.all_gather_object(torch.cat(kept) if kept else torch.empty(0, feature_dim_of(features.protocol)))
        gathered = torch.cat(parts).numpy().astype(np.float32)
    meta = {"format": STATS_FORMAT, "count": num, "protocol": features.protocol, "source": source,
            "resolution": source.get("resolution"), "world_size": comm.get_world_size(),
            "seconds": round(time.perf_counter() - started, 3)}
    return mu, sigma, meta, gathered
