"""The iCT objective (Song & Dhariwal 2023, eq. 8 with the pseudo-Huber metric of §3.3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import karras_sigmas, ict_weights, lognormal_index_probs

PSEUDO_HUBER_SCALE = 0.00054


def pseudo_huber_c(sample_shape) -> float:
    """c = 0.00054 * sqrt(d) for samples of d = C*H*W dimensions (iCT §3.3)."""
    return PSEUDO_HUBER_SCALE * math.sqrt(math.prod(sample_shape))


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """d(a, b) = sqrt(||a - b||_2^2 + c^2) - c over each WHOLE sample: one value per sample (iCT eq. 9)."""
    if c is None:
        c = pseudo_huber_c(a.shape[1:])
    sq = (a - b).to(torch.float32).pow(2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


def squared_l2(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """||a - b||_2^2 per sample (the metric of the original CT paper without LPIPS)."""
    return (a - b).to(torch.float32).pow(2).flatten(1).sum(1)


METRICS = {"pseudo_huber": pseudo_huber, "l2": squared_l2}


@dataclass(frozen=True)
class Discretisation:
    """Everything the loss needs for one N, computed once per curriculum stage in float64."""
    sigmas: torch.Tensor      # (N,) ascending boundaries
    probs: torch.Tensor       # (N-1,) index distribution
    weights: torch.Tensor     # (N-1,) lambda_i

    @staticmethod
    def build(num_scales: int, sigma_min: float, sigma_max: float, rho: float, p_mean: float, p_std: float,
              index_sampling: str = "lognormal") -> "Discretisation":
        sigmas = karras_sigmas(num_scales, sigma_min, sigma_max, rho)
        if index_sampling == "lognormal":
            probs = lognormal_index_probs(sigmas, p_mean, p_std)
        elif index_sampling == "uniform":
            probs = torch.full((num_scales - 1,), 1.0 / (num_scales - 1), dtype=torch.float64)
        else:
            raise ValueError(f"index_sampling must be 'lognormal' or 'uniform', got {index_sampling!r}")
        return Discretisation(sigmas, probs, ict_weights(sigmas))


def sample_intervals(disc: Discretisation, batch: int, generator: torch.Generator | None = None,
                     device=None):
    """Draw i ~ p(i) per sample; return (sigma_i, sigma_{i+1}, lambda_i) as float32 on `device`."""
    idx = torch.multinomial(disc.probs, batch, replacement=True, generator=generator)
    table = torch.stack([disc.sigmas[idx], disc.sigmas[idx + 1], disc.weights[idx]]).float()  # float64 -> cast
    if device is not None and torch.device(device).type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)  # one asynchronous copy, no host sync
    elif device is not None:
        table = table.to(device)
    return table[0], table[1], table[2]


def consistency_pair(student: Callable, teacher: Callable, x: torch.Tensor, z: torch.Tensor,
                     sigma_lo: torch.Tensor, sigma_hi: torch.Tensor, class_labels=None,
                     teacher_in_grad_mode: bool = False):
    """Student f(x + s_{i+1} z, s_{i+1}) and teacher f(x + s_i z, s_i) with ONE z and ONE dropout mask.

    The RNG state (CPU and, where present, CUDA) is forked and restored so that both passes draw the
    same dropout masks. The teacher's output is detached (stop-gradient). By default it runs under
    no_grad, so no gradient hook or reducer sees it. `teacher_in_grad_mode` runs it with autograd on
    instead (its graph is dropped at once): a compiled network then runs the student's own training
    graph for the teacher, the same kernels, where a separate no-grad graph would round differently.
    """
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with torch.set_grad_enabled(teacher_in_grad_mode):
            target = teacher(x + sigma_lo.view(-1, 1, 1, 1) * z, sigma_lo, class_labels).detach()
    pred = student(x + sigma_hi.view(-1, 1, 1, 1) * z, sigma_hi, class_labels)
    return pred, target
