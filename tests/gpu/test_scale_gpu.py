"""The parallel layer on real GPUs (NCCL, bf16): skipped without 4 CUDA devices.

Runs benchmarks/scale_gpu.py's equivalence, resume and two-agent phases (about 3 minutes on 4 H100s) and
requires every check to pass; the committed results are in benchmarks/results/scale_gpu_*.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA devices")]


def test_backends_agree_resume_at_half_the_gpus_and_join_two_agents(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "scale_gpu.py"), "--out", str(tmp_path),
           "--phases", "equivalence,resume,two_node", "--budget-s", "1200"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "scale_gpu.json") as f:
        results = json.load(f)
    checks = {f"{phase} {name}": rec for phase in ("equivalence", "resume")
              for name, rec in results[phase].items() if name != "single"}
    checks["two_node"] = results["two_node"]
    assert "skipped" not in results["equivalence"]
    for name, rec in checks.items():
        assert rec.get("ok"), f"{name}: {rec}"
