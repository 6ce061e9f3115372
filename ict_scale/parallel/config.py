"""Configuration of the parallel layer (composed into the run config as `parallel`), and the narrow
settings a backend receives instead of the whole run config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

BackendName = Literal["single", "ddp", "fsdp", "deepspeed"]
BACKENDS: tuple[str, ...] = get_args(BackendName)  # the closed registry of ict_scale.parallel.build
Precision = Literal["auto", "bf16", "fp32"]
TeacherPass = Literal["auto", "no_grad", "student_graph"]


@dataclass
class ParallelConfig:
    """How the model is spread over processes, checkpointed, and stopped; a field's comment is its documentation."""
    backend: BackendName = "single"   # single (one process) | ddp (replicas) | fsdp (FSDP2 shards) | deepspeed (ZeRO)
    timeout_s: int = 1800             # collective timeout in seconds: a hung rank fails the job instead of stalling it
    activation_checkpointing: bool = False  # recompute each block's activations in backward (same dropout masks)
    ddp_bucket_cap_mb: int = 25       # DDP gradient bucket size in MiB
    fsdp_reshard_after_forward: bool = True  # free gathered weights after each block's forward (less memory)
    fsdp_shard_size: int = 0          # ranks per shard group: 0 = all (FSDP); 8 = shard in a node, replicate across (HSDP)
    fsdp_cpu_offload: bool = False    # sharded params, grads and optimizer state in CPU memory (the step runs on CPU)
    deepspeed_config: str = "configs/deepspeed/zero2.yaml"  # DeepSpeed YAML/JSON: ZeRO stage, bf16/fp16 (not batch keys)
    async_save: bool = False          # write DCP checkpoints in the background (the COMMIT marker follows completion)
    preempt_grace_s: float = 120.0    # after SIGTERM/SIGUSR1/SIGINT: seconds to finish the step and save before exiting regardless


@dataclass(frozen=True)
class ExecutionConfig:
    """How a backend runs the network: the few training settings it applies (train.precision, .channels_last,
    .compile, .cudnn_benchmark, .teacher_pass; their documentation is in the train section)."""
    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = False
    teacher_pass: TeacherPass = "auto"

    @classmethod
    def from_train(cls, train) -> ExecutionConfig:
        """The execution settings of a run's `train` section (the one place they are read from it)."""
        return cls(**{f.name: getattr(train, f.name) for f in dataclasses.fields(cls)})
