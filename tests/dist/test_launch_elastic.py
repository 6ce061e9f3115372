"""Launch, failure and preemption end to end: torchrun restarts, SIGTERM, and the launcher scripts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from workers.harness import (REPO, TINY, checkpoint, free_port, metrics, run_ok, started, torchrun_cmd, wait_for_steps,
                             worker_env)

pytestmark = pytest.mark.dist


def losses_by_attempt(run_dir: str) -> list[dict[int, float]]:
    """metrics.jsonl split where the step count goes back (a restarted group logs from its resume step)."""
    attempts, last = [{}], 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["step"] <= last:
                attempts.append({})
            attempts[-1][rec["step"]] = rec["loss"]
            last = rec["step"]
    return attempts


def test_a_rank_killed_mid_checkpoint_is_restarted_by_torchrun_and_resumes_the_last_complete_one(tmp_path):
    run_dir = str(tmp_path / "run")
    args = [*TINY, f"train.run_dir={run_dir}", "parallel.backend=ddp", "train.total_steps=7", "train.ckpt_every=3",
            # The surviving rank waits in a collective for the dead one; torchrun's SIGTERM then ends it
            # within the grace period (the timeout is a second guard).
            "parallel.preempt_grace_s=3", "parallel.timeout_s=60"]
    # Rank 1 dies by SIGKILL after writing its shards of checkpoint 6, before the COMMIT marker.
    done = run_ok(torchrun_cmd(2, "train.py", *args, max_restarts=1),
                  env=worker_env(ICT_TEST_DIE_IN_SAVE="6:1"))
    assert started(done.stdout, "ddp", 2, 0, run_dir)
    assert started(done.stdout, "ddp", 2, 3, run_dir)   # the interrupted checkpoint 6 was not picked up
    checkpoint(run_dir, 7)
    first, second = losses_by_attempt(run_dir)
    assert sorted(first) == [1, 2, 3, 4, 5, 6] and sorted(second) == [4, 5, 6, 7]
    for step in (4, 5, 6):  # the restarted group recomputes exactly what the first attempt computed
        assert second[step] == pytest.approx(first[step], rel=1e-7)


def test_sigterm_to_torchrun_makes_every_rank_checkpoint_the_same_step_and_exit(tmp_path):
    run_dir = str(tmp_path / "run")
    args = [*TINY, f"train.run_dir={run_dir}", "parallel.backend=ddp", "train.total_steps=100000",
            "train.ckpt_every=100000"]
    proc = subprocess.Popen(torchrun_cmd(2, "train.py", *args), cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc, steps=3)
    proc.send_signal(signal.SIGTERM)  # the agent forwards it to both workers
    stdout, stderr = proc.communicate(timeout=120)
    steps = [int(d.split("_")[1]) for d in os.listdir(os.path.join(run_dir, "checkpoints"))]
    assert len(steps) == 1 and 3 <= steps[0] < 100000, steps
    checkpoint(run_dir, steps[0])
    assert f"preemption signal {int(signal.SIGTERM)}: checkpoint written at step {steps[0]}" in stdout, stderr[-3000:]
    assert max(metrics(run_dir)) == steps[0]


def test_deepspeed_launcher_script_trains_two_ranks(tmp_path):
    run_dir = str(tmp_path / "run")
    env = worker_env(NUM_GPUS=2, MASTER_PORT=free_port(), PYTHON=sys.executable)
    done = run_ok(["bash", "launchers/ds.sh", *TINY, f"train.run_dir={run_dir}", "train.total_steps=2",
                   "train.ckpt_every=2", "parallel.deepspeed_config=configs/deepspeed/zero1.yaml"], env=env)
    assert started(done.stdout, "deepspeed", 2, 0, run_dir)
    with open(os.path.join(checkpoint(run_dir, 2), "deepspeed.json")) as f:
        assert json.load(f) == {"world_size": 2, "zero_stage": 1}


def test_deepspeed_launcher_runs_the_script_as_users_type_it(tmp_path):
    """`deepspeed launchers/ds.sh ...`: the launcher runs the file with python on every rank."""
    run_dir = str(tmp_path / "run")
    env = worker_env()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launchers/ds.sh", *TINY, f"train.run_dir={run_dir}", "train.total_steps=2", "train.ckpt_every=2",
           "parallel.deepspeed_config=configs/deepspeed/zero1.yaml"]
    done = run_ok(cmd, env=env)
    assert started(done.stdout, "deepspeed", 2, 0, run_dir)
    with open(os.path.join(checkpoint(run_dir, 2), "deepspeed.json")) as f:
        assert json.load(f) == {"world_size": 2, "zero_stage": 1}


def test_torchrun_script_joins_two_agents_through_c10d_rendezvous(tmp_path):
    """Two 'nodes' (agents) of one rank each on this host, meeting at one rendezvous endpoint."""
    run_dir = str(tmp_path / "run")
    env = worker_env(NNODES=2, NPROC_PER_NODE=1, RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", PYTHON=sys.executable,
                     RDZV_ID="two-agents", MAX_RESTARTS=0)
    cmd = ["bash", "launchers/torchrun.sh", *TINY, f"train.run_dir={run_dir}", "parallel.backend=ddp",
           "train.total_steps=2", "train.ckpt_every=2"]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=240) for a in agents]
    for agent, (out, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    assert any(started(out, "ddp", 2, 0, run_dir) for out, _ in outputs)
    checkpoint(run_dir, 2)


def test_sigterm_to_the_process_group_with_loader_workers_still_checkpoints(tmp_path):
    # Slurm and `timeout` signal every process of the group, DataLoader workers included: the workers must
    # leave the signal to the trainer, or their deaths abort the run before its preemption checkpoint.
    run_dir = str(tmp_path / "run")
    args = [*TINY, f"train.run_dir={run_dir}", "data.num_workers=2", "train.total_steps=100000",
            "train.ckpt_every=100000"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "dist", "workers", "train.py"), *args],
                            cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_steps(run_dir, proc, steps=3)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    steps = [int(d.split("_")[1]) for d in os.listdir(os.path.join(run_dir, "checkpoints"))]
    assert len(steps) == 1 and 3 <= steps[0] < 100000, steps
    checkpoint(run_dir, steps[0])
    assert f"preemption signal {int(signal.SIGTERM)}: checkpoint written at step {steps[0]}" in stdout, stderr[-3000:]
