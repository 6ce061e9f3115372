"""Who-am-I from launcher environments, and the preemption grace period (no process group needed)."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from ict_scale.parallel.launch_env import LaunchEnv, first_host, read_launch_env
from workers.harness import REPO, worker_env


def test_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n0",
           "MASTER_PORT": "29400", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"}  # srun started torchrun: its variables win
    assert read_launch_env(env) == LaunchEnv(5, 16, 1, 4, "n0", 29400, "torchrun", 2, True)


def test_deepspeed_launcher_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500"}
    assert read_launch_env(env) == LaunchEnv(3, 4, 1, 2, "10.0.0.1", 29500, "torchrun")


def test_slurm_task_environment():
    env = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]"}
    assert read_launch_env(env) == LaunchEnv(9, 16, 1, 8, "gpu007", 20000 + 123456 % 20000, "slurm")
    env.update(MASTER_ADDR="head", MASTER_PORT="1234")
    assert read_launch_env(env) == LaunchEnv(9, 16, 1, 8, "head", 1234, "slurm")


def test_slurm_batch_script_without_srun_is_a_world_of_one():
    # The batch script has SLURM_PROCID=0 and SLURM_NTASKS=16 but is one process: no rendezvous.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[1-2]"}
    assert read_launch_env(env) == LaunchEnv(0, 1, 0, 1, None, None, "none")


@pytest.mark.parametrize("nodelist, host", [("gpu[007-010,012],cpu1", "gpu007"), ("node12", "node12"),
                                            ("a-b[3,5]", "a-b3"), ("r[1-2]n[08-09],x", "r1n08")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_bad_rank_value_is_named():
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "two"})


PREEMPTED = r"""
import os, signal, sys, time
from ict_scale.train.signals import PreemptionFlag
flag = PreemptionFlag(grace_s={grace})
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)  # a second signal neither restarts nor shortens the grace period
assert flag.requested and flag.signum == signal.SIGTERM
print("flagged", flush=True)
{after}
"""


def test_preemption_grace_period_ends_a_stuck_process():
    code = PREEMPTED.format(grace=0.5, after="time.sleep(60)  # a step or save that never finishes")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.startswith("flagged")
    assert done.returncode == 128 + signal.SIGTERM
    assert "checkpoint is not complete" in done.stderr


def test_preemption_grace_timer_is_cancelled_once_the_run_returns():
    code = PREEMPTED.format(grace=0.5, after="flag.close(); time.sleep(1.0); print('clean')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["flagged", "clean"]
