"""Process set-up shared by the evaluation command lines (evaluate, ref_stats, the FID benchmark).

Joining a torchrun job goes through `ict_scale.parallel.comm.init_from_env`, because only the parallel
package may touch torch.distributed; a single process needs no group at all.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from ict_scale.parallel import comm
from ict_scale.parallel.launch_env import device_for


def init_distributed() -> torch.device:
    """Join the torchrun job when WORLD_SIZE > 1; return this process's device (cuda:LOCAL_RANK or cpu)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not comm.is_initialized():
        return comm.init_from_env()
    return device_for(int(os.environ.get("LOCAL_RANK", "0")))


def sampling_autocast(device: torch.device, precision: str):
    """A context factory for the generator's forward: bf16 autocast or plain fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision={precision!r}: expected fp32 or bf16")
