"""One iCT optimiser step: seeding, micro-batch accumulation and backward. No I/O, no logging, no knowledge of
the parallel backend's kind; the objective itself is ict.ICTLoss."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ict_scale.ict import ICTLoss


@dataclass
class StepResult:
    loss: torch.Tensor        # mean weighted loss over the global step (this rank's share), device scalar
    grad_norm: torch.Tensor   # global gradient norm, device scalar
    num_scales: int


def micro_batch_seed(seed: int, step: int, position: int) -> int:
    """Seed of the micro-batch at `position` (= micro index * world size + rank) within step `step`."""
    return ((seed * 1_000_003 + step) * 2_654_435_761 + position) % (1 << 63)


def train_step(backend, objective: ICTLoss, micro_batches, step: int, seed: int, teacher=None) -> StepResult:
    """Forward/backward over the micro-batches, then return loss and grad norm; the caller decides to step.

    `teacher` is the module of theta^- (original CT's EMA teacher); None means iCT's teacher, the student's
    current weights through backend.teacher().

    All randomness of a micro-batch (intervals, z, dropout masks) is drawn after seeding from (seed, step,
    position of the micro-batch in the global batch). The loader orders samples the same way, so a step is
    the same computation at any world size and accumulation, and a resumed run repeats it exactly.
    """
    # An EMA teacher has weights of its own: no graph to share with the student.
    teacher_in_grad_mode = teacher is None and backend.teacher_in_grad_mode()
    teacher = teacher if teacher is not None else backend.teacher()
    total = torch.zeros((), device=backend.device)
    for i, (x, labels) in enumerate(micro_batches):
        torch.manual_seed(micro_batch_seed(seed, step, i * backend.world_size + backend.rank))
        with backend.accumulate(last_micro_batch=i == len(micro_batches) - 1):
            loss = objective(backend.model, teacher, x, labels, step, teacher_in_grad_mode=teacher_in_grad_mode,
                             autocast=backend.autocast).mean() / len(micro_batches)
            backend.backward(loss)
            total += loss.detach()
    return StepResult(total, backend.grad_norm(), objective.num_scales(step))
