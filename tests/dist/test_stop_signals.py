"""Ctrl-C and the preemption grace period with real processes: nothing since the last checkpoint is lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from workers.harness import (REPO, TINY, WORKERS, checkpoint, started, torchrun_cmd, wait_for_steps,
                             worker_env)

pytestmark = pytest.mark.dist

ENDLESS = ["train.total_steps=100000", "train.ckpt_every=100000"]


def complete_steps(run_dir: str) -> list[int]:
    root = os.path.join(run_dir, "checkpoints")
    return sorted(int(d.split("_")[1]) for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "COMMIT")))


def test_ctrl_c_checkpoints_the_current_step_and_the_same_command_resumes(tmp_path):
    # A terminal's Ctrl-C signals the whole foreground process group: the trainer and its loader workers.
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "ict_scale.train", *TINY, f"train.run_dir={run_dir}", "data.num_workers=2"]
    proc = subprocess.Popen([*cmd, *ENDLESS], cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_steps(run_dir, proc, steps=3)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "Ctrl-C: finishing this step and writing a checkpoint" in stderr
    [step] = complete_steps(run_dir)
    assert 3 <= step < 100000
    assert f"Ctrl-C: checkpoint written at step {step} of 100000; run the same command to resume" in stdout
    resumed = subprocess.run([*cmd, "train.total_steps=100000", "train.max_steps_this_run=2"], cwd=REPO,
                             env=worker_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert started(resumed.stdout, "single", 1, step, run_dir)
    checkpoint(run_dir, step + 2)


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        # Every save first sleeps 60 s: the first Ctrl-C's checkpoint is still being written when the second comes.
        proc = subprocess.Popen([sys.executable, os.path.join(WORKERS, "train.py"), *TINY, f"train.run_dir={run_dir}",
                                 *ENDLESS], cwd=REPO, env=worker_env(ICT_TEST_SLOW_SAVE=60),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for_steps(run_dir, proc, steps=3)
        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while "finishing this step" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert "finishing this step" in log.read_text(), log.read_text()[-3000:]
        time.sleep(1.0)  # into the save
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=20)
        assert time.monotonic() - sent < 10
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = log.read_text()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "second Ctrl-C: aborting now" in stderr and "Traceback" not in stderr
    assert complete_steps(run_dir) == []


def test_ctrl_c_of_torchrun_checkpoints_every_rank_at_the_same_step(tmp_path):
    # On Ctrl-C the agent sends SIGINT to each worker's process group (workers run in sessions of their own).
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen(torchrun_cmd(2, "train.py", *TINY, f"train.run_dir={run_dir}", "parallel.backend=ddp",
                                         "data.num_workers=1", *ENDLESS),
                            cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc, steps=3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    [step] = complete_steps(run_dir)
    assert 3 <= step < 100000
    assert f"Ctrl-C: checkpoint written at step {step} of 100000" in stdout, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"])


def has_exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_grace_period_ends_a_rank_blocked_in_a_collective_with_a_frozen_peer(tmp_path):
    grace_s = 3.0
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen(torchrun_cmd(2, "train.py", *TINY, f"train.run_dir={run_dir}", "parallel.backend=ddp",
                                         f"parallel.preempt_grace_s={grace_s}", "parallel.timeout_s=600", *ENDLESS),
                            cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = {}
    try:
        wait_for_steps(run_dir, proc, steps=3)
        ranks = {rank_of(pid): pid for pid in children(proc.pid)}
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)  # a peer frozen (a hung host): rank 0 waits in its next collective
        time.sleep(2.0)
        os.kill(ranks[0], signal.SIGTERM)
        sent = time.monotonic()
        while not has_exited(ranks[0]) and time.monotonic() - sent < grace_s + 30:
            time.sleep(0.1)
        waited = time.monotonic() - sent
        assert has_exited(ranks[0]), f"rank 0 still running {waited:.0f} s after SIGTERM (grace {grace_s} s)"
        assert waited < grace_s + 10
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
    assert f"SIGTERM was {grace_s:.0f} s ago and the checkpoint is not complete" in stderr
