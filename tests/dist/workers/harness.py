"""Helpers of the multi-process CPU (gloo) tests: a tiny run config, torchrun launches, reading results."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

WORKERS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(WORKERS)))

# A network of about 0.2M parameters on 8x8 images: a step takes milliseconds, yet every block type,
# dropout and the label embedding are exercised. Global batch 12 divides into 1, 2, 3 and 4 ranks.
TINY = [
    "data.source=synthetic", "data.resolution=8", "data.num_workers=0", "data.num_classes=10",
    "model.name=ncsnpp", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1",
    "model.attn_resolutions=[]", "model.dropout=0.3",
    "train.batch_size=12", "train.batch_per_gpu=1", "train.log_every=1", "train.grid_every=0", "train.grid_num=4",
    "train.precision=fp32", "train.channels_last=false", "eval.sigma_mid=0.821",
    # A large learning rate makes every step move the weights well above float32 reduction noise.
    "optim.lr=1e-3",
]


def worker_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",          # 2-4 ranks on 2 cores: more threads only contend
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
        "CUDA_VISIBLE_DEVICES": "",      # the CPU/gloo path, also on a GPU machine
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun_cmd(nproc: int, script: str, *args, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", os.path.join(WORKERS, script), *args]


def run_ok(cmd: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` to completion; on failure show the end of its output."""
    done = subprocess.run(cmd, cwd=REPO, env=env or worker_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
                    f"--- stderr\n{done.stderr[-6000:]}")
    return done


def train(nproc: int, run_dir: str, *overrides: str, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    """Train through ict_scale.train.loop.train in `nproc` torchrun workers."""
    args = [*TINY, f"train.run_dir={run_dir}", *overrides]
    return run_ok(torchrun_cmd(nproc, "train.py", *args), timeout=timeout, env=worker_env(**env))


def train_many(nproc: int, runs: list[list[str]], spec_path: str, timeout: float = 300,
               **env) -> subprocess.CompletedProcess:
    """Several runs (override lists, TINY prepended) one after another in one group of `nproc` workers."""
    with open(spec_path, "w") as f:
        json.dump([[*TINY, *overrides] for overrides in runs], f)
    return run_ok(torchrun_cmd(nproc, "train.py", "--runs", spec_path), timeout=timeout, env=worker_env(**env))


def started(stdout: str, backend: str, world: int, step: int, run_dir: str) -> bool:
    """Whether the run's banner says it (re)started at `step` with this backend and world size."""
    verb = "resuming at" if step else "starting at"
    pattern = rf"backend {backend} x{world}\b[^\n]*{verb} step {step}, run dir {re.escape(run_dir)}\n"
    return re.search(pattern, stdout) is not None


def metrics(run_dir: str) -> dict[int, dict]:
    """metrics.jsonl of a run by step (a resumed run appends; the newest record of a step wins)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = record
    return out


def checkpoint(run_dir: str, step: int) -> str:
    path = os.path.join(run_dir, "checkpoints", f"step_{step:09d}")
    assert os.path.exists(os.path.join(path, "COMMIT")), f"no complete checkpoint at step {step} in {run_dir}"
    return path


def ema_of(ckpt: str) -> dict[str, torch.Tensor]:
    """The full EMA of any backend's checkpoint, read the way export does."""
    from ict_scale.config import load_config
    from ict_scale.parallel import dcp_io
    from ict_scale.train.model import build_model
    model = build_model(load_config([os.path.join(ckpt, "config.yaml")], []))
    ema = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    dcp_io.load_ema(ckpt, ema)
    return ema


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_steps(run_dir: str, proc: subprocess.Popen, steps: int, timeout_s: float = 180) -> None:
    """Wait until the run in `proc` has logged `steps` steps (log_every=1)."""
    deadline = time.monotonic() + timeout_s
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended early:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if os.path.exists(path) and len(open(path).read().splitlines()) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {steps} logged steps within {timeout_s} s")
