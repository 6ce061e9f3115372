"""The command lines: argument merging, where results go, refusals, and one end-to-end evaluation of a trained run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import ref_stats
from ict_scale import evaluate
from ict_scale.eval import EvalConfig


def test_command_line_values_override_the_run_config():
    run_eval = EvalConfig(num=50000, steps=[1, 2], ref="s3://bucket/cifar10.npz", sigma_mid=None, seed=4)
    args = evaluate.parse_args(["runs/x", "--num", "1000", "--steps", "2", "--sigma-mid", "1.526"])
    cfg = evaluate.eval_config(run_eval, args)
    assert (cfg.num, cfg.steps, cfg.sigma_mid, cfg.ref, cfg.seed) == (1000, [2], 1.526, "s3://bucket/cifar10.npz", 4)
    assert evaluate.eval_config(run_eval, evaluate.parse_args(["runs/x"])) == run_eval


@pytest.mark.parametrize("path, run_dir", [
    ("runs/cifar10", "runs/cifar10"),
    ("runs/cifar10/", "runs/cifar10"),
    ("runs/cifar10/checkpoints/step_000400000", "runs/cifar10"),
    ("s3://bucket/runs/a/checkpoints/step_000000100", "s3://bucket/runs/a"),
    ("checkpoints/step_000000100", "."),
    ("exports/step_000000100", "exports"),
])
def test_results_go_to_the_run_directory(path, run_dir):
    assert evaluate.run_dir_of(path) == run_dir


def test_ref_stats_of_synthetic_data_needs_a_count(tmp_path):
    with pytest.raises(SystemExit, match="synthetic data needs --num"):
        ref_stats.main(["--data", "synthetic", "--out", str(tmp_path / "r.npz"), "--workers", "0"])
    assert not (tmp_path / "r.npz").exists()


def test_num_samples_alias_for_torchrun():
    # torchrun's own parser rejects '--num' after the script (an ambiguous prefix of --numa-binding).
    assert evaluate.parse_args(["runs/x", "--num-samples", "7"]).num == 7
    assert ref_stats.parse_args(["--data", "synthetic", "--out", "o.npz", "--num-samples", "9"]).num == 9


def test_evaluate_a_trained_run_end_to_end(tmp_path, capsys):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_dir = str(tmp_path / "run")
    subprocess.run([sys.executable, "-m", "ict_scale.train", os.path.join(repo, "configs", "demo.yaml"),
                    f"train.run_dir={run_dir}", "train.total_steps=2", "train.batch_size=4", "train.batch_per_gpu=4",
                    "train.grid_num=4"], cwd=tmp_path, check=True, capture_output=True)
    ref = str(tmp_path / "edm_layout.npz")
    np.savez(ref, mu=np.full(2048, 0.1), sigma=np.eye(2048) * 0.01)  # EDM's layout: no protocol to check against
    assert evaluate.main([run_dir, "--ref", ref, "--num", "3", "--steps", "1", "--batch-per-rank", "2",
                          "--random-inception", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num"] == 3 and printed["step"] == 2 and printed["ref_layout"] == "edm" and printed["fid_1step"] > 0
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["checkpoint"] == "checkpoints/step_000000002" and best["value"] == printed["fid_1step"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {"step": 2, "num": 3, "seconds": printed["seconds"], "fid_1step": printed["fid_1step"]}
    # The same evaluation as two torchrun processes (3 samples split 2 + 1): the same FID.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ict_scale.evaluate", run_dir, "--ref", ref, "--num-samples", "3", "--steps", "1",
                           "--batch-per-rank", "2", "--random-inception", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout[done.stdout.index("{"):])
    assert two["world_size"] == 2 and two["num"] == 3
    assert abs(two["fid_1step"] - printed["fid_1step"]) <= 1e-9 * printed["fid_1step"]
