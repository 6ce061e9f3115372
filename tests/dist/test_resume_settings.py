"""On resume under DDP the optimiser runs with the config's settings (a lower lr), as config.yaml records."""
from __future__ import annotations

import pytest

from workers.harness import metrics, train_many

pytestmark = pytest.mark.dist


def test_a_lower_lr_on_resume_is_applied_under_ddp(tmp_path):
    run_dir = str(tmp_path / "run")
    base = ["parallel.backend=ddp", "train.total_steps=3", f"train.run_dir={run_dir}"]
    done = train_many(2, [[*base, "optim.lr=1e-3", "train.max_steps_this_run=1"], [*base, "optim.lr=5e-4"]],
                      str(tmp_path / "runs.json"))
    assert "optim.lr 0.001 -> 0.0005" in done.stdout
    assert [metrics(run_dir)[s]["lr"] for s in (1, 2, 3)] == [1e-3, 5e-4, 5e-4]
