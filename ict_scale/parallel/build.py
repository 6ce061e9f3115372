"""Choose and build the backend a run names: the closed registry, and the one place where the run's config
is narrowed to what a backend may see (its `parallel` section and an ExecutionConfig).

Apart from backend.py so that the backends import the base class without importing one another.
"""
from __future__ import annotations

import os

from ict_scale.config.schema import accumulation_steps

from .backend import Backend
from .config import BACKENDS, ExecutionConfig
from .launch_env import read_launch_env


def build_backend(cfg) -> Backend:
    """The backend chosen by `parallel.backend`; a distributed one joins the launcher's process group."""
    name, parallel, execution = cfg.parallel.backend, cfg.parallel, ExecutionConfig.from_train(cfg.train)
    if name == "single":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(f"parallel.backend=single runs one process, but WORLD_SIZE={os.environ['WORLD_SIZE']}; "
                               "choose parallel.backend=ddp, fsdp or deepspeed")
        return Backend(parallel, execution)
    # Imported on demand: the DeepSpeed backend imports deepspeed, which a plain run should not need.
    if name == "ddp":
        from .ddp import DDPBackend
        return DDPBackend(parallel, execution, read_launch_env())
    if name == "fsdp":
        from .fsdp import FSDPBackend
        return FSDPBackend(parallel, execution, read_launch_env())
    if name == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend
        env = read_launch_env()
        # The engine is told the batch geometry (it scales the loss and steps on its own boundary).
        return DeepSpeedBackend(parallel, execution, env, batch_per_gpu=cfg.train.batch_per_gpu,
                                accumulation=accumulation_steps(cfg.train, env.world_size))
    raise ValueError(f"parallel.backend={name!r} is not available; valid: {', '.join(BACKENDS)}")
