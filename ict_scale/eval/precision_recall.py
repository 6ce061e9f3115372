"""Improved precision and recall (Kynkaanniemi et al. 2019, §3) on Inception features, k = 3.

Each set's manifold is the union of balls around its samples, of radius the distance to the k-th nearest
other sample of the same set. precision = share of generated samples inside the real manifold;
recall = share of real samples inside the generated manifold. Distances are Euclidean, in fp32 with TF32
off, computed block by block so that memory stays O(block x N).
"""
from __future__ import annotations

import torch

from .inception import exact_fp32


def knn_radii(features: torch.Tensor, k: int = 3, block: int = 4096) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the row itself, at distance 0, is skipped)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    radii = []
    with exact_fp32():
        for part in features.split(block):
            d = torch.cdist(part, features)
            radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the smallest is the row itself
    return torch.cat(radii)


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int = 4096) -> float:
    """Share of `queries` within radii[j] of some support[j]: the manifold indicator, averaged."""
    inside = 0
    with exact_fp32():
        for part in queries.split(block):
            d = torch.cdist(part, support)
            inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 4096) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real` feature sets (N, D), any device, float32."""
    real, fake = real.to(torch.float32), fake.to(device=real.device, dtype=torch.float32)
    precision = manifold_coverage(fake, real, knn_radii(real, k, block), block)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, block), block)
    return precision, recall
