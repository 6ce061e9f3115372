"""Original CT's EMA teacher under DDP: 2 gloo ranks compute what one process computes.

Each rank keeps a full teacher updated from its own replica of theta; after DDP's all-reduced step
the replicas agree, so the teachers do too, and the losses match the single-process run up to
float32 reduction order.
"""
from __future__ import annotations

import pytest
import torch

from workers.harness import TINY, checkpoint, max_abs_diff, metrics, started, train

pytestmark = pytest.mark.dist

RUN = ["train.total_steps=3", "ict.teacher=ema", "ict.teacher_mu0=0.5"]
LOSS_RTOL = 1e-5     # float32 sums in another order (see test_backends.py)
WEIGHT_ATOL = 1e-7


def teacher_of(ckpt: str) -> dict[str, torch.Tensor]:
    """The teacher's parameters as saved in a checkpoint (under the trainer's prefix of the EMA dict)."""
    from ict_scale.config import load_config
    from ict_scale.parallel import dcp_io
    from ict_scale.train.model import build_model
    from ict_scale.checkpoint.layout import TEACHER_PREFIX
    model = build_model(load_config([f"{ckpt}/config.yaml"], []))
    tensors = {TEACHER_PREFIX + n: torch.zeros_like(p) for n, p in model.named_parameters()}
    dcp_io.load_ema(ckpt, tensors)
    return tensors


def test_ddp_with_ema_teacher_matches_one_process(tmp_path):
    from ict_scale.config import load_config
    from ict_scale.train.loop import train as train_here
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    done = train(2, ddp, *RUN, "parallel.backend=ddp")
    assert started(done.stdout, "ddp", 2, 0, ddp)
    train_here(load_config([], [*TINY, *RUN, f"train.run_dir={single}"]))
    got, want = metrics(ddp), metrics(single)
    for s in (1, 2, 3):  # step 1's teacher is theta itself; steps 2 and 3 use the averaged theta^-
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=LOSS_RTOL), f"loss at step {s}"
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=LOSS_RTOL), f"grad norm at step {s}"
    diff = max_abs_diff(teacher_of(checkpoint(ddp, 3)), teacher_of(checkpoint(single, 3)))
    assert diff < WEIGHT_ATOL, f"EMA teacher at step 3 differs by {diff}"
