"""The teacher pass with autograd on (train.teacher_pass=student_graph, the default under compile) computes
exactly what the no_grad pass computes on every backend, and leaves no gradient or hook state behind.

Under torch.compile the two modes differ on purpose: with autograd on, the teacher reuses the student's
compiled training graph (tests/gpu checks that the passes then agree at equal sigma). In eager mode both
run the same kernels, so every loss, gradient norm and weight must be identical, step after step: a
grad-mode teacher whose graph leaked into the student's backward, or that left FSDP2 / ZeRO-3 hooks
half-done, would change them or fail.
"""
from __future__ import annotations

import pytest

from workers.harness import ema_of, checkpoint, metrics, train_many

pytestmark = pytest.mark.dist

ZERO3_TINY = "zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}\n"
STEPS = 3


def test_student_graph_teacher_equals_no_grad_teacher_on_every_backend(tmp_path):
    (tmp_path / "zero3.yaml").write_text(ZERO3_TINY)
    backends = {
        "ddp": ["parallel.backend=ddp"],
        "fsdp": ["parallel.backend=fsdp", "train.precision=bf16"],
        "zero2": ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.yaml",
                  "train.precision=bf16"],
        "zero3": ["parallel.backend=deepspeed", f"parallel.deepspeed_config={tmp_path / 'zero3.yaml'}"],
    }
    runs, dirs = [], {}
    for name, overrides in backends.items():
        for mode in ("no_grad", "student_graph"):
            dirs[name, mode] = str(tmp_path / f"{name}_{mode}")
            runs.append([*overrides, f"train.teacher_pass={mode}", f"train.total_steps={STEPS}",
                         f"train.ckpt_every={STEPS}", "train.batch_size=4", f"train.run_dir={dirs[name, mode]}"])
    train_many(2, runs, str(tmp_path / "spec.json"), timeout=400)
    for name in backends:
        ref, shared = metrics(dirs[name, "no_grad"]), metrics(dirs[name, "student_graph"])
        assert sorted(ref) == sorted(shared) == list(range(1, STEPS + 1)), name
        for step in ref:
            assert shared[step]["loss"] == ref[step]["loss"], (name, step)
            assert shared[step]["grad_norm"] == ref[step]["grad_norm"], (name, step)
        a, b = ema_of(checkpoint(dirs[name, "no_grad"], STEPS)), ema_of(checkpoint(dirs[name, "student_graph"], STEPS))
        assert all(bool((a[k] == b[k]).all()) for k in a), name
