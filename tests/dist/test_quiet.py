"""What a user sees: known library noise stays out of the output of single-process, DDP and DeepSpeed runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from workers.harness import TINY, free_port, run_ok, train_many, worker_env

pytestmark = pytest.mark.dist

# Each message once seen on every run (the tests' own environment ignores warnings: here they show).
NOISE = (
    "assuming the intent is to",           # torch DCP on each single-process save and load
    "broadcast_buffers` is deprecated",    # DDP's keyword rename
    "Grad strides do not match",           # DDP copying autograd's gradients into its buckets
    "untested optimizer",                  # DeepSpeed on the recipe's RAdam
    "all_gather_into_tensor` is deprecated",  # torch, on DeepSpeed's ZeRO gathers
    "[INFO]",                              # the DeepSpeed launcher's command lines
)


def loud_env(**extra) -> dict:
    return worker_env(PYTHONWARNINGS="default", **extra)


def assert_quiet(done: subprocess.CompletedProcess) -> None:
    output = done.stdout + done.stderr
    assert not [n for n in NOISE if n in output], output[-4000:]


def test_single_process_run_and_resume_are_quiet(tmp_path):
    cmd = [sys.executable, "-m", "ict_scale.train", *TINY, f"train.run_dir={tmp_path / 'run'}", "train.total_steps=2",
           "train.ckpt_every=1"]
    first = run_ok([*cmd, "train.max_steps_this_run=1"], env=loud_env())
    resumed = run_ok(cmd, env=loud_env())  # loads the checkpoint of step 1, saves step 2
    assert "resuming at step 1" in resumed.stdout
    for done in (first, resumed):
        assert_quiet(done)
        assert done.stderr == ""


def test_ddp_run_and_resume_with_bf16_and_accumulation_are_quiet(tmp_path):
    # bf16 autocast makes a 1x1 convolution's weight gradient arrive with other strides in its size-1
    # dimensions; accumulation (2 micro-batches) adds gradients across backward passes. The second run
    # resumes the first's checkpoint in the same processes.
    run = ["parallel.backend=ddp", "train.precision=bf16", "train.batch_per_gpu=3", "train.total_steps=3",
           "train.ckpt_every=1", f"train.run_dir={tmp_path / 'run'}"]
    done = train_many(2, [[*run, "train.max_steps_this_run=2"], run], str(tmp_path / "runs.json"),
                      PYTHONWARNINGS="default")
    assert "resuming at step 2" in done.stdout
    assert_quiet(done)


def test_deepspeed_launcher_run_is_quiet_and_names_the_optimiser_once(tmp_path):
    env = loud_env(NUM_GPUS=2, MASTER_PORT=free_port(), PYTHON=sys.executable)
    done = run_ok(["bash", "launchers/ds.sh", *TINY, f"train.run_dir={tmp_path / 'run'}", "train.total_steps=2",
                   "train.ckpt_every=2", "parallel.deepspeed_config=configs/deepspeed/zero2.yaml"], env=env)
    assert_quiet(done)
    assert done.stdout.count("deepspeed: ZeRO-2 with the recipe's torch.optim.RAdam") == 1
