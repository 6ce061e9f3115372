"""Consistency sampling: the k-step noise levels, the noise, the sampler (Song et al. 2023, Algorithm 1).

The one home of how samples are drawn: training grids, `python -m ict_scale.sample` and the FID stage take
their noise levels from `sampling_sigmas` and run `generate_uint8`. Grids and the sample command draw their
noise with `sampling_noise` from one seeded generator; the FID stage draws the same tensors per sample from
generators keyed by (seed, index) (eval/generate.py), so that its samples do not depend on the world size.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from .schedule import SIGMA_MAX, SIGMA_MIN

MAX_STEPS = 2  # 1- and 2-step sampling, the paper's evaluated settings (iCT §6)


def sampling_sigmas(steps: int, sigma_max: float, sigma_mid: float) -> tuple[float, ...]:
    """Noise levels of k-step sampling (iCT §6): (sigma_max,) or (sigma_max, sigma_mid)."""
    if steps == 1:
        return (sigma_max,)
    if steps == 2:
        return (sigma_max, sigma_mid)
    raise ValueError(f"only 1- and 2-step sampling are defined here, got steps={steps}")


def sampling_noise(num: int, shape: Sequence[int], generator: torch.Generator,
                   num_renoise: int = MAX_STEPS - 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(z, re-noise list): unit normal (num, *shape) tensors drawn from `generator`, z first.

    z comes first so that the one-step samples do not depend on how many re-noise tensors follow, and
    anything drawn after them (e.g. class labels) sees the same generator state for 1- and 2-step sampling.
    """
    z = torch.randn((num, *shape), generator=generator)
    return z, [torch.randn((num, *shape), generator=generator) for _ in range(num_renoise)]


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


@torch.no_grad()
def generate_uint8(model: Callable, z: torch.Tensor, renoise: Sequence[torch.Tensor], labels: torch.Tensor | None,
                   sigmas: Sequence[float], sigma_min: float,
                   autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """uint8 (N, C, H, W) samples on z's device; re-noise tensors beyond len(sigmas) - 1 are not used.

    Quantisation: nearest integer of (x + 1) * 127.5 (ties to even), clamped to [0, 255] - `to_uint8`.
    Rounding to nearest is unbiased (mean error 0, at most half a level); truncating casts, which some
    sampling scripts use, darken every pixel by half a level on average and shift the statistics.
    The reference images are uint8 too, so both sides reach Inception through the same 256 levels.
    """
    with autocast():
        x = multistep_sample(model, z, sigmas, labels, list(renoise[:len(sigmas) - 1]), sigma_min)
    return to_uint8(x)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] images to float32 [-1, 1] (x / 127.5 - 1): the data scaling of training (iCT §1)."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 by round-half-to-even of (x + 1) * 127.5, clamped (the EDM/ADM convention)."""
    return ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
