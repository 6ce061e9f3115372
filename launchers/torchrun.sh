#!/usr/bin/env bash
# Elastic multi-node training with torchrun: c10d rendezvous, restarts on failure, auto-resume.
#
# Run the same command on every node (or once, for one node):
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29400 \
#     bash launchers/torchrun.sh configs/cifar10.yaml parallel.backend=fsdp
#
# Environment (all optional):
#   NNODES          nodes, or MIN:MAX for an elastic range (default 1)
#   NPROC_PER_NODE  processes per node (default: number of visible GPUs, else 1)
#   RDZV_ENDPOINT   host:port of the rendezvous store, reachable from every node (default: single-node standalone)
#   RDZV_ID         job id shared by all nodes of one job (default ict_scale)
#   MAX_RESTARTS    times the whole group is restarted after a worker fails (default 3); every restart
#                   resumes from the newest complete checkpoint in train.run_dir
#   SHUTDOWN_S      seconds workers get between the forwarded SIGTERM/SIGUSR1 and SIGKILL (default 150);
#                   keep parallel.preempt_grace_s (default 120) below it so the checkpoint fits inside
#   PYTHON          interpreter with ict_scale installed (default python)
set -euo pipefail

PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_S=${SHUTDOWN_S:-150}

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-ict_scale}")
elif [[ "$NNODES" == "1" ]]; then
  rdzv=(--standalone)
else
  echo "error: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (a node every node can reach)" >&2
  exit 2
fi

# torchrun forwards SIGTERM by default; Slurm's --signal and many schedulers send SIGUSR1 first.
signals=()
if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--signals-to-handle"; then
  signals=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
fi
# Read by torchrun (recent versions) as the default of --shutdown-timeout.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_S
# NVLink multicast (NVLS) can wedge shared GPUs on some hosts; off unless the caller says otherwise.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rdzv[@]}" \
  --max-restarts "$MAX_RESTARTS" "${signals[@]}" -m ict_scale.train "$@"
