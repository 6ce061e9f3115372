"""Who am I: rank and world size from torchrun, the DeepSpeed launcher or Slurm, and the process group.

torchrun and the DeepSpeed launcher both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `srun` without either exports SLURM_PROCID and friends instead. A process started by
hand is a world of one and gets a process group too, so every backend has one code path.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    launcher: str                      # torchrun (also the DeepSpeed launcher) | slurm | none
    attempt: int = 0                   # torchrun's restart count (TORCHELASTIC_RESTART_COUNT)
    agent_store: bool = False          # torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT


def _int(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[007-010,012],cpu1' -> 'gpu007', 'r[1-2]n[3-4]' -> 'r1n3'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    if not first or depth < 0 or not re.fullmatch(r"[^\[\],]*(\[[^\[\]]+\][^\[\],]*)*", first):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list")
    # Each bracket's first entry ('a' or 'a-b') gives the first host; its start keeps its zero padding.
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _tasks_on_first_node(spec: str) -> int:
    """'4(x2),2' -> 4: Slurm's per-node task counts; every node of a GPU job usually has the same."""
    m = re.match(r"^(\d+)", spec)
    if not m:
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not a Slurm task count list")
    return int(m.group(1))


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch environment; torchrun/DeepSpeed variables win over Slurm's (srun may start torchrun)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        # torchrun exports LOCAL_WORLD_SIZE, the DeepSpeed launcher LOCAL_SIZE.
        local_world = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or str(world)
        return LaunchEnv(_int(env, "RANK"), world, int(env.get("LOCAL_RANK", "0")), int(local_world),
                         env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
                         "torchrun", int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                         env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
    # SLURM_STEP_NUM_TASKS exists only inside an srun step, never in the batch script itself (which
    # would otherwise wait forever for peers that were never started).
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        # Every task derives the same port from the job id; two jobs sharing a node rarely collide.
        port = int(env.get("MASTER_PORT", 20000 + job_id % 20000))
        local_world = _tasks_on_first_node(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
        return LaunchEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                         int(env.get("SLURM_LOCALID", "0")), local_world, addr, port, "slurm")
    return LaunchEnv(0, 1, 0, 1, None, None, "none")


def device_for(local_rank: int = 0) -> torch.device:
    """This process's device: cuda:LOCAL_RANK (made current) when GPUs exist, else CPU. The one place that decides."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(env: LaunchEnv, device: torch.device, timeout_s: float) -> None:
    """NCCL for CUDA tensors (gloo beside it for CPU ones, e.g. async checkpoint staging), gloo on CPU."""
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise RuntimeError(f"a process group of {dist.get_world_size()} ranks exists, but the launcher "
                               f"says WORLD_SIZE={env.world_size}")
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if env.launcher == "none":
        # A world of one needs no rendezvous: an in-memory store, no port to pick.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
        return
    if env.master_addr is None or env.master_port is None:
        raise RuntimeError(f"launched by {env.launcher} with WORLD_SIZE={env.world_size} but MASTER_ADDR/MASTER_PORT "
                           "are not set")
    if env.agent_store:
        # torchrun's agent hosts one store for every restart of the group, and a process group's keys
        # (each rank's address) carry no attempt number: a restarted rank could read the address of
        # its dead predecessor and fail to connect. A prefix per attempt keeps the rounds apart.
        store = dist.TCPStore(env.master_addr, env.master_port, world_size=env.world_size, is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"ict_scale/attempt_{env.attempt}", store),
                                rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs)
        return
    # The DeepSpeed launcher and Slurm have no agent: rank 0 hosts the store at the given address.
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    dist.init_process_group(backend, init_method=f"tcp://{host}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, timeout=timeout, **kwargs)
