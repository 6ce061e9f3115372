"""Improved precision/recall and what an evaluation writes into the run directory."""
import json

import numpy as np
import pytest
import torch

from ict_scale.eval import EvalConfig, best_metric, check_eval_config, precision_recall, record_result
from ict_scale.eval.precision_recall import knn_radii


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int = 3):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(q, s, r):
        d = np.linalg.norm(q[:, None] - s[None], axis=-1)
        return float((d <= r[None]).any(axis=1).mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_equals_brute_force():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 5))
    fake = rng.standard_normal((45, 5)) * 0.6 + 0.8  # partly overlapping, narrower
    p, r = precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k=3, block=16)
    bp, br = brute_force_pr(real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64))
    assert (p, r) == pytest.approx((bp, br), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_limits():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((30, 4))).float()
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than k=3"):
        knn_radii(x[:3])


def test_best_metric_prefers_fewest_steps():
    assert best_metric({"fid_2step": 3.0, "fid_1step": 4.0, "num": 10}) == "fid_1step"
    assert best_metric({"fid_2step": 3.0}) == "fid_2step"
    with pytest.raises(ValueError, match="no fid_"):
        best_metric({"num": 3})


def test_records_append_lines_and_track_the_best(tmp_path):
    run_dir = str(tmp_path / "run")
    base = {"num": 8, "seconds": 1.5, "protocol": {"weights_sha256": "x"}}
    record_result(run_dir, {"step": 100, "fid_1step": 9.0, "fid_2step": 7.0, **base}, "checkpoints/step_000000100")
    best = record_result(run_dir, {"step": 200, "fid_1step": 5.0, "fid_2step": 6.0, "precision_1step": 0.5, **base},
                         "checkpoints/step_000000200")
    assert best["checkpoint"] == "checkpoints/step_000000200" and best["value"] == 5.0
    best = record_result(run_dir, {"step": 300, "fid_1step": 6.0, "fid_2step": 4.0, **base},
                         "checkpoints/step_000000300")
    assert best["step"] == 200  # the two-step FID improved, but checkpoints are ranked by the one-step FID
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [100, 200, 300]
    assert lines[1] == {"step": 200, "fid_1step": 5.0, "fid_2step": 6.0, "precision_1step": 0.5, "num": 8,
                        "seconds": 1.5}
    on_disk = json.loads((tmp_path / "run" / "best.json").read_text())
    assert on_disk["checkpoint"] == "checkpoints/step_000000200" and on_disk["metric"] == "fid_1step"
    latest = json.loads((tmp_path / "run" / "fid.json").read_text())
    assert latest["step"] == 300 and latest["checkpoint"] == "checkpoints/step_000000300"
    assert latest["protocol"] == {"weights_sha256": "x"}


@pytest.mark.parametrize("field, value, match", [
    ("steps", [1, 3], "eval.steps"), ("steps", [1, 1], "eval.steps"), ("num", 1, "eval.num"),
    ("batch_per_rank", 0, "eval.batch_per_rank"), ("seed", -1, "eval.seed"), ("sigma_mid", 0.0, "eval.sigma_mid"),
])
def test_eval_config_checks_name_the_key(field, value, match):
    with pytest.raises(ValueError, match=match):
        check_eval_config(EvalConfig(**{field: value}))
    check_eval_config(EvalConfig())
