"""Resuming under torchrun: the config's optimiser settings are used (DDP), and DeepSpeed's checkpoint files
are loaded as data only (a crafted file that would run code is refused)."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from workers.harness import REPO, TINY, metrics, torchrun_cmd, train, train_many, worker_env

pytestmark = pytest.mark.dist


def test_a_lower_lr_on_resume_is_applied_under_ddp(tmp_path):
    run_dir = str(tmp_path / "run")
    base = ["parallel.backend=ddp", "train.total_steps=3", f"train.run_dir={run_dir}"]
    done = train_many(2, [[*base, "optim.lr=1e-3", "train.max_steps_this_run=1"], [*base, "optim.lr=5e-4"]],
                      str(tmp_path / "runs.json"))
    assert "optim.lr 0.001 -> 0.0005" in done.stdout
    assert [metrics(run_dir)[s]["lr"] for s in (1, 2, 3)] == [1e-3, 5e-4, 5e-4]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_deepspeed_engine_file_that_would_run_code_is_refused(tmp_path):
    run_dir, marker = str(tmp_path / "run"), tmp_path / "pwned"
    ds = ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.yaml",
          "train.total_steps=2"]
    train(1, run_dir, *ds, "train.max_steps_this_run=1")
    model_states = os.path.join(run_dir, "checkpoints", "step_000000001", "engine", "mp_rank_00_model_states.pt")
    torch.save({"module": _RunsCode(marker)}, model_states)
    done = subprocess.run(torchrun_cmd(1, "train.py", *TINY, f"train.run_dir={run_dir}", *ds), cwd=REPO,
                          env=worker_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "refusing to load a DeepSpeed checkpoint file" in done.stdout + done.stderr
    assert not marker.exists()
