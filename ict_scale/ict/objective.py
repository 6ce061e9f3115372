"""The iCT objective (Song & Dhariwal 2023, eq. 8 with the pseudo-Huber metric of §3.3) as one object.

`ICTLoss` composes the pieces below with the curriculum of schedule.py: at step k it takes N(k), the
discretisation of N(k), draws the intervals and the shared noise, runs the consistency pair and returns
lambda_i d(student, teacher) per sample. The training step only seeds, accumulates and backpropagates.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from .schedule import (ct_teacher_decay, ict_weights, karras_sigmas, lognormal_index_probs, num_scales_at,
                       num_scales_sqrt_at)

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


@lru_cache(maxsize=4)
def discretisation(num_scales: int, sigma_min: float, sigma_max: float, rho: float, p_mean: float,
                   p_std: float, index_sampling: str) -> Discretisation:
    """Discretisation.build, cached per N: the curriculum changes N a handful of times in a whole run."""
    return Discretisation.build(num_scales, sigma_min, sigma_max, rho, p_mean, p_std, index_sampling)


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


CURRICULA = {"doubling": num_scales_at, "sqrt": num_scales_sqrt_at}  # N(k): iCT eq. 6 | original CT's App. C


class ICTLoss:
    """L = E[lambda_i d(f_theta(x + sigma_{i+1} z, sigma_{i+1}), f_theta-(x + sigma_i z, sigma_i))] (iCT eq. 8).

    Built from the iCT section of the config (its fields: sigma_min, sigma_max, rho, s0, s1, p_mean, p_std,
    metric, index_sampling, curriculum, teacher_mu0) and the run's total steps K, which set the curriculum.
    Everything that changes during training is a function of the step k, so the object has no state to save.
    """

    def __init__(self, ict, total_steps: int):
        if ict.metric not in METRICS:
            raise ValueError(f"ict.metric={ict.metric!r}: expected one of {list(METRICS)}")
        if ict.curriculum not in CURRICULA:
            raise ValueError(f"ict.curriculum={ict.curriculum!r}: expected one of {list(CURRICULA)}")
        self.ict, self.total_steps = ict, total_steps
        self.metric = METRICS[ict.metric]

    def num_scales(self, step: int) -> int:
        """N(k) of the configured curriculum: doubling (iCT eq. 6) or original CT's square root."""
        return CURRICULA[self.ict.curriculum](step, self.total_steps, self.ict.s0, self.ict.s1)

    def teacher_decay(self, step: int) -> float:
        """mu(k) of original CT's EMA teacher (CT App. C); 0 for teacher_mu0 = 0, i.e. iCT's theta^- = theta."""
        # s0 of CT's formula is the curriculum's initial N, so that mu(0) = teacher_mu0 under either curriculum.
        return ct_teacher_decay(self.num_scales(step), self.num_scales(0), self.ict.teacher_mu0)

    def discretisation(self, step: int) -> Discretisation:
        """Boundaries, interval probabilities p(i) and weights lambda_i for N(k) (iCT eq. 5, 7 and §3.4)."""
        i = self.ict
        return discretisation(self.num_scales(step), i.sigma_min, i.sigma_max, i.rho, i.p_mean, i.p_std,
                              i.index_sampling)

    def __call__(self, student: Callable, teacher: Callable, x: torch.Tensor, labels: torch.Tensor | None,
                 step: int, *, teacher_in_grad_mode: bool = False,
                 autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
        """lambda_i d(student, teacher) per sample (shape (B,), float32) at step k.

        Draws, in this order, from the global generators: the intervals i ~ p(i) (CPU), z ~ N(0, I) like x
        (x's device), then the pair's dropout masks. The caller seeds once before the call, so a seed fixes
        the whole loss. `autocast` wraps the two network passes only; the metric is computed in float32.
        """
        disc = self.discretisation(step)
        sigma_lo, sigma_hi, weight = sample_intervals(disc, x.shape[0], device=x.device)
        z = torch.randn_like(x)  # one z per sample, shared by student and teacher (iCT eq. 8)
        with autocast():
            pred, target = consistency_pair(student, teacher, x, z, sigma_lo, sigma_hi, labels, teacher_in_grad_mode)
        return weight * self.metric(pred, target, pseudo_huber_c(x.shape[1:]))
