"""One iCT optimiser step: no I/O, no logging, no knowledge of the parallel backend's kind."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ict_scale.ict import METRICS, Discretisation, consistency_pair, ct_teacher_decay, num_scales_at, \
    num_scales_sqrt_at, pseudo_huber_c, sample_intervals


@lru_cache(maxsize=4)
def discretisation(num_scales: int, sigma_min: float, sigma_max: float, rho: float, p_mean: float,
                   p_std: float, index_sampling: str) -> Discretisation:
    """Cached per N: the curriculum changes N a handful of times in a whole run."""
    return Discretisation.build(num_scales, sigma_min, sigma_max, rho, p_mean, p_std, index_sampling)


def num_scales_for(ict, step: int, total_steps: int) -> int:
    """N(k) for the configured curriculum: doubling (iCT eq. 6) or CT's square root."""
    if ict.curriculum == "sqrt":
        return num_scales_sqrt_at(step, total_steps, ict.s0, ict.s1)
    return num_scales_at(step, total_steps, ict.s0, ict.s1)


def teacher_decay_for(ict, num_scales: int, total_steps: int) -> float:
    """mu(k) of original CT's EMA teacher at a step whose curriculum gives N(k) = num_scales (CT App. C)."""
    # s0 of CT's formula is the curriculum's initial N, so that mu(0) = teacher_mu0 under either curriculum.
    return ct_teacher_decay(num_scales, num_scales_for(ict, 0, total_steps), ict.teacher_mu0)


@dataclass
class StepResult:
    loss: torch.Tensor        # mean weighted loss over the global step (this rank's share), device scalar
    grad_norm: torch.Tensor   # global gradient norm, device scalar
    num_scales: int


def micro_batch_seed(seed: int, step: int, position: int) -> int:
    """Seed of the micro-batch at `position` (= micro index * world size + rank) within step `step`."""
    return ((seed * 1_000_003 + step) * 2_654_435_761 + position) % (1 << 63)


def train_step(backend, micro_batches, step: int, cfg, teacher=None) -> StepResult:
    """Forward/backward over the micro-batches, then return loss and grad norm; the caller decides to step.

    `teacher` is the module of theta^- (original CT's EMA teacher); None means iCT's teacher, the student's
    current weights through backend.teacher().

    All randomness of a micro-batch (intervals, z, dropout masks) is drawn after seeding from (seed, step,
    position of the micro-batch in the global batch). The loader orders samples the same way, so a step is
    the same computation at any world size and accumulation, and a resumed run repeats it exactly.
    """
    ict = cfg.ict
    num_scales = num_scales_for(ict, step, cfg.train.total_steps)
    disc = discretisation(num_scales, ict.sigma_min, ict.sigma_max, ict.rho, ict.p_mean, ict.p_std,
                          ict.index_sampling)
    metric = METRICS[ict.metric]
    # An EMA teacher has weights of its own: no graph to share with the student.
    teacher_in_grad_mode = teacher is None and backend.teacher_in_grad_mode()
    teacher = teacher if teacher is not None else backend.teacher()
    total = torch.zeros((), device=backend.device)
    for i, (x, labels) in enumerate(micro_batches):
        torch.manual_seed(micro_batch_seed(cfg.train.seed, step, i * backend.world_size + backend.rank))
        with backend.accumulate(last_micro_batch=i == len(micro_batches) - 1):
            sigma_lo, sigma_hi, weight = sample_intervals(disc, x.shape[0], device=x.device)
            z = torch.randn_like(x)  # one z per sample, shared by student and teacher (iCT eq. 8)
            with backend.autocast():
                pred, target = consistency_pair(backend.model, teacher, x, z, sigma_lo, sigma_hi, labels,
                                                teacher_in_grad_mode)
            loss = (weight * metric(pred, target, pseudo_huber_c(x.shape[1:]))).mean() / len(micro_batches)
            backend.backward(loss)
            total += loss.detach()
    return StepResult(total, backend.grad_norm(), num_scales)
