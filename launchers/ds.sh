#!/usr/bin/env bash
"true" '''\'
# Training under the DeepSpeed launcher (hostfile, one process per GPU, pdsh/ssh to other nodes).
# This file is both a bash script and a Python script, so both of these work:
#
#   deepspeed --hostfile hostfile launchers/ds.sh cifar10 parallel.deepspeed_config=configs/deepspeed/zero3.yaml
#   HOSTFILE=hostfile bash launchers/ds.sh imagenet64
#
# The bash form runs the launcher with --log_level warning; in the first form, add `--log_level warning` after
# `deepspeed` to drop the launcher's INFO lines (each command it runs, the world layout).
#
# The deepspeed launcher runs its script argument with python (`python -u launchers/ds.sh --local_rank=N ...`):
# the Python part at the bottom then starts ict_scale.train on that rank. Run with bash, the script calls the
# launcher itself as `deepspeed --module --no_local_rank ict_scale.train`. Either way parallel.backend=deepspeed
# is appended; ranks read RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the environment.
#
# Environment for the bash form (all optional):
#   HOSTFILE     DeepSpeed hostfile ("node0 slots=8" per line); without it, this node only
#   NUM_GPUS     processes per node (default: all visible GPUs; on a CPU-only machine set it)
#   MASTER_PORT  rendezvous port on the first host (default 29500)
#   PYTHON       interpreter with ict_scale and deepspeed installed (default python)
#   DS_LOG_LEVEL the launcher's log level (default warning; info shows each command it runs)
set -euo pipefail

PYTHON=${PYTHON:-python}
# --log_level warning: the launcher's INFO lines (its command, world info, every spawned command line) bury the run's.
args=(--master_port "${MASTER_PORT:-29500}" --log_level "${DS_LOG_LEVEL:-warning}")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

# --no_local_rank: ranks take LOCAL_RANK from the environment, so the trainer's command line stays ours.
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module --no_local_rank ict_scale.train "$@" \
  parallel.backend=deepspeed
'''
# Python: one rank started by the deepspeed launcher. Drop its --local_rank argument (LOCAL_RANK is also in
# the environment) and run the trainer with the DeepSpeed backend.
import sys

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
if not any(a.startswith("parallel.backend=") for a in argv):
    argv.append("parallel.backend=deepspeed")
from ict_scale.train.__main__ import main  # noqa: E402

sys.exit(main(argv))
# (this last quote closes, for bash -n, the string that the bash part never reaches) '
