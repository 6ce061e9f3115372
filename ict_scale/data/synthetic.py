"""A procedural, class-conditional image distribution that needs no files.

Every image is a pure function of (seed, global index): a shape whose kind and colour family are
set by the class label, drawn at a random position, size, rotation and colour jitter over a
two-colour gradient background, with an optional texture. Generation is vectorised over a batch
of indices with a counter-based hash, so any slice of the infinite sequence can be produced in
any order, on any rank, with the same result.
"""
from __future__ import annotations

import math

import torch

# Colour families (RGB in [0, 1]); a class picks one, each sample jitters it.
PALETTES = torch.tensor([
    [0.90, 0.20, 0.15],  # red
    [0.15, 0.45, 0.90],  # blue
    [0.95, 0.80, 0.10],  # yellow
    [0.20, 0.75, 0.30],  # green
    [0.70, 0.25, 0.80],  # purple
    [0.95, 0.55, 0.10],  # orange
    [0.10, 0.80, 0.80],  # cyan
    [0.95, 0.95, 0.95],  # white
])
SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond", "striped_disk", "checker_square")
_MASK64 = (1 << 63) - 1


def _hash(idx: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """SplitMix64-style integer hash of (seed, stream, idx) -> non-negative int64 (wrapping arithmetic)."""
    x = idx.to(torch.int64) * 0x9E3779B97F4A7C15 % (1 << 63)  # spread consecutive indices
    x = x ^ (seed * 0x632BE59BD9B4E5 + stream * 0x2545F4914F6CDD1D) & _MASK64
    for mul in (0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)):
        x = (x ^ (x >> 31)) * mul
    x = x ^ (x >> 29)
    return x & _MASK64


def uniform(idx: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Deterministic U[0, 1) per index, independent across streams (float64)."""
    return (_hash(idx, seed, stream) >> 11).to(torch.float64) / float(1 << 52)


def synthetic_labels(idx: torch.Tensor, seed: int, num_classes: int) -> torch.Tensor:
    return (_hash(idx, seed, 0) % num_classes).to(torch.int64)


def _shape_distance(kind: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed-ish distance (negative inside) of each pixel to the outline of shape `kind`."""
    d = torch.sqrt(x * x + y * y)
    ax, ay = x.abs(), y.abs()
    tri = torch.maximum(torch.maximum(-y - 0.5 * r, 0.866 * x + 0.5 * y - 0.5 * r), -0.866 * x + 0.5 * y - 0.5 * r)
    per_kind = torch.stack([
        d - r,                                                        # disk
        torch.maximum(ax, ay) - 0.8 * r,                              # square
        tri * 1.6,                                                    # triangle
        (d - 0.7 * r).abs() - 0.25 * r,                               # ring
        torch.minimum(torch.maximum(ax, 3 * ay), torch.maximum(3 * ax, ay)) - r,  # cross
        ax + ay - r,                                                  # diamond
        d - r,                                                        # striped disk (texture below)
        torch.maximum(ax, ay) - 0.8 * r,                              # checker square (texture below)
    ])
    return torch.gather(per_kind, 0, kind.unsqueeze(0).expand(1, *x.shape)).squeeze(0)


def synthetic_images(idx: torch.Tensor, seed: int = 0, resolution: int = 32, num_classes: int = 10):
    """Images (uint8, N x 3 x R x R) and labels (int64, N) for global sample indices `idx`."""
    idx = idx.to(torch.int64).flatten()
    n = idx.numel()
    labels = synthetic_labels(idx, seed, num_classes)
    u = [uniform(idx, seed, s).float().view(n, 1, 1) for s in range(1, 13)]
    kind = (labels % len(SHAPES)).view(n, 1, 1)
    palette = PALETTES[(labels // len(SHAPES) + labels) % len(PALETTES)].view(n, 3, 1, 1)

    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy = (u[0] - 0.5) * 0.8, (u[1] - 0.5) * 0.8
    radius = 0.25 + 0.3 * u[2]
    theta = u[3] * (2 * math.pi)
    x0, y0 = gx - cx, gy - cy
    x = x0 * torch.cos(theta) + y0 * torch.sin(theta)
    y = -x0 * torch.sin(theta) + y0 * torch.cos(theta)

    dist = _shape_distance(kind, x, y, radius)
    pixel = 2.0 / resolution
    mask = (0.5 - dist / pixel).clamp(0, 1)
    freq = 3 + 4 * u[4]
    stripes = (torch.sin(x * freq * math.pi / radius) > 0).float()
    checker = ((torch.floor(x * 2.5 / radius) + torch.floor(y * 2.5 / radius)) % 2).float()
    texture = torch.where(kind == 6, 0.55 + 0.45 * stripes, torch.where(kind == 7, 0.55 + 0.45 * checker, 1.0))

    fg = (palette + (torch.stack([u[5], u[6], u[7]], 1) - 0.5) * 0.25).clamp(0, 1)
    bg_a = 0.15 + 0.35 * torch.stack([u[8], u[9], u[10]], 1)
    bg_b = bg_a.flip(1) * 0.8
    t = ((gx * torch.cos(u[11] * 6.283) + gy * torch.sin(u[11] * 6.283)) * 0.5 + 0.5).unsqueeze(1)
    background = bg_a * (1 - t) + bg_b * t
    mask = mask.unsqueeze(1)
    image = background * (1 - mask) + fg * texture.unsqueeze(1) * mask
    return (image * 255).round().clamp(0, 255).to(torch.uint8), labels
