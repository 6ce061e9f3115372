"""Configuration of the parallel layer (composed into the run config as `parallel`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """How the model is spread over processes, checkpointed, and stopped; a field's comment is its documentation."""
    backend: str = "single"           # single | ddp | fsdp | deepspeed
    timeout_s: int = 1800             # collective timeout in seconds: a hung rank fails the job instead of stalling it
    activation_checkpointing: bool = False  # recompute each block's activations in backward (same dropout masks)
    ddp_bucket_cap_mb: int = 25       # DDP gradient bucket size in MiB
    fsdp_reshard_after_forward: bool = True  # free gathered weights after each block's forward (less memory)
    fsdp_shard_size: int = 0          # ranks per shard group: 0 = all (FSDP); 8 = shard in a node, replicate across (HSDP)
    fsdp_cpu_offload: bool = False    # sharded params, grads and optimizer state in CPU memory (the step runs on CPU)
    deepspeed_config: str = "configs/deepspeed/zero2.yaml"  # DeepSpeed YAML/JSON: ZeRO stage, bf16/fp16 (not batch keys)
    async_save: bool = False          # write DCP checkpoints in the background (the COMMIT marker follows completion)
    preempt_grace_s: float = 120.0    # after SIGTERM/SIGUSR1/SIGINT: seconds to finish the step and save before exiting regardless
