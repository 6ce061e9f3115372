"""Sample grids with fixed seeds: the same noise every time, so grids from different steps compare."""
from __future__ import annotations

import io
import math

import torch

from ict_scale.ict import generate_uint8, sampling_noise, sampling_sigmas


def fixed_noise(num: int, shape, seed: int, num_classes: int, device):
    """z, re-noise list and labels for grid sample j depend only on (seed, j)."""
    z, renoise = sampling_noise(num, shape, torch.Generator().manual_seed(seed + 7919))
    labels = torch.arange(num) % num_classes if num_classes > 0 else None
    to = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    return to(z), [to(r) for r in renoise], (to(labels) if labels is not None else None)


@torch.no_grad()
def sample_images(model, z, renoise, labels, sigma_max: float, sigma_mid: float, steps: int, sigma_min: float,
                  batch: int = 256) -> torch.Tensor:
    """uint8 NCHW samples (on the CPU) from `model` with 1 or 2 steps, in batches."""
    sigmas = sampling_sigmas(steps, sigma_max, sigma_mid)
    out = []
    for s in range(0, z.shape[0], batch):
        part = slice(s, s + batch)
        lab = labels[part] if labels is not None else None
        out.append(generate_uint8(model, z[part], [r[part] for r in renoise], lab, sigmas, sigma_min).cpu())
    return torch.cat(out)


GUTTER_PX = 2       # between cells, after upscaling: thin strokes of neighbouring samples never touch
GUTTER_VALUE = 255  # white lines: visible between dark and mid-grey samples alike


def grid_png(images: torch.Tensor, upscale: int = 1, gutter: int = GUTTER_PX) -> bytes:
    """A near-square PNG grid of uint8 NCHW images, each cell upscaled (nearest) and `gutter` px apart."""
    from PIL import Image
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cells = images.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3).permute(0, 2, 3, 1)
    h, w = h * upscale, w * upscale
    canvas = torch.full((rows * h + (rows - 1) * gutter, cols * w + (cols - 1) * gutter, c), GUTTER_VALUE,
                        dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = r * (h + gutter), k * (w + gutter)
        canvas[top:top + h, left:left + w] = cells[i]
    img = Image.fromarray(canvas.squeeze(-1).numpy() if c == 1 else canvas.numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
