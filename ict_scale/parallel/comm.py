"""Thin collective helpers: the only place outside the backends that touches torch.distributed.

Every function works with no process group too (a single process is the smallest world), so
callers never branch on "am I distributed".
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks and return it (identity in a world of one)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Return rank `src`'s `obj` on every rank."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_from_env(timeout_s: float = 1800) -> torch.device:
    """Join the job a launcher (torchrun, Slurm, DeepSpeed) started; return this rank's device.

    For command-line tools outside training (evaluation, reference statistics); a world of one needs no group.
    """
    from .launch_env import device_for, init_process_group, read_launch_env
    env = read_launch_env()
    device = device_for(env.local_rank)
    if env.world_size > 1:
        init_process_group(env, device, timeout_s)
    return device


def destroy() -> None:
    """Leave the process group (once, at the end of the process; later collectives would fail)."""
    if is_initialized():
        dist.destroy_process_group()
