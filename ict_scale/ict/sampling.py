"""One-step and multistep consistency sampling (Song et al. 2023, Algorithm 1)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .schedule import SIGMA_MAX, SIGMA_MIN


def multistep_sample(model: Callable, z: torch.Tensor, sigmas: Sequence[float] = (SIGMA_MAX,),
                     class_labels: torch.Tensor | None = None, renoise: Sequence[torch.Tensor] = (),
                     sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """x = f(sigma_0 z, sigma_0); then for each later tau: x = f(x + sqrt(tau^2 - sigma_min^2) z_k, tau).

    `sigmas` is descending and starts at sigma_max; `renoise[k]` is the unit normal noise for step k+1
    (len(sigmas) - 1 tensors shaped like z), passed in so that every sample's noise can come from its own
    seed. Returns samples clipped to [-1, 1].
    """
    if len(renoise) != len(sigmas) - 1:
        raise ValueError(f"need {len(sigmas) - 1} re-noise tensors for {len(sigmas)} steps, got {len(renoise)}")
    batch = z.shape[0]
    sigma = torch.full((batch,), float(sigmas[0]), device=z.device)
    x = model(z * float(sigmas[0]), sigma, class_labels)
    for tau, z_k in zip(sigmas[1:], renoise):
        x = x.clamp(-1, 1) + (float(tau) ** 2 - sigma_min ** 2) ** 0.5 * z_k  # denoised estimate kept in range
        x = model(x, torch.full((batch,), float(tau), device=z.device), class_labels)
    return x.clamp(-1, 1)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] images to float32 [-1, 1] (x / 127.5 - 1): the data scaling of training (iCT §1)."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 by round-half-to-even of (x + 1) * 127.5, clamped (the EDM/ADM convention)."""
    return ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
