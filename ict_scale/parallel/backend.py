"""The one interface the training step talks to, and the single-process backend.

A backend owns how the model is placed and wrapped, how gradients are reduced, how the optimiser
steps, and how its state becomes bytes. It sees only its own settings (`parallel`) and how the network
runs (`ExecutionConfig`), never the rest of the run's config. The training step calls only these
methods, so the same step runs on one CPU process, one GPU, or many nodes:

    backend = build_backend(cfg)                 # parallel.build: sets up the process group (torchrun / Slurm / DeepSpeed env)
    backend.prepare(module, make_optimizer)      # place, checkpoint, compile, wrap/shard; build the optimiser
    with backend.accumulate(last), backend.autocast(): ... backend.backward(loss)
    backend.grad_norm(); backend.optimizer_step(); backend.zero_grad()
    backend.save(url, ema_state) / backend.load(url, ema_state)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
from torch import nn

from . import dcp_io
from .blocks import apply_activation_checkpointing, apply_compile
from .config import ExecutionConfig, ParallelConfig
from .launch_env import LaunchEnv, device_for, init_process_group


class Backend:
    """Base class: a single process, no wrapping. Subclasses override what they change."""

    name = "single"

    def __init__(self, parallel: ParallelConfig, execution: ExecutionConfig, device: torch.device | None = None,
                 rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.parallel, self.execution = parallel, execution
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device or device_for(local_rank)
        # fp32 or bf16: `auto` is bf16 on CUDA, fp32 on CPU (decided once, for the device this rank holds).
        self.precision = execution.precision if execution.precision != "auto" else \
            ("bf16" if self.device.type == "cuda" else "fp32")
        self.module: nn.Module | None = None   # the unwrapped ConsistencyModel
        self.model: nn.Module | None = None    # what the student forward calls (possibly wrapped)
        self.optimizer: torch.optim.Optimizer | None = None
        self._eval_copy: nn.Module | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self, module: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]) -> None:
        """Place (and in subclasses wrap/shard) the model, then build the optimiser over its parameters."""
        self.module = self._place(module)
        self.model = self.module
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def _place(self, module: nn.Module, channels_last_weights: bool = True) -> nn.Module:
        """Device, memory format, then the per-block transforms (before any wrapper sees the module).

        Sharding backends pass channels_last_weights=False: they flatten parameters into contiguous
        shards. channels_last inputs (train.channels_last) still select the NHWC convolution kernels.
        """
        module = module.to(self.device)
        if self.device.type == "cuda":
            # Opt-in: the search may choose other algorithms in a resumed process, which breaks bit-identical resume.
            torch.backends.cudnn.benchmark = bool(self.execution.cudnn_benchmark)
        if self.execution.channels_last and self.device.type == "cuda" and channels_last_weights:
            module.to(memory_format=torch.channels_last)
        if self.parallel.activation_checkpointing:
            apply_activation_checkpointing(module)
        if self.execution.compile:
            apply_compile(module)
        return module

    # -- the step -------------------------------------------------------------------------------
    def teacher(self) -> nn.Module:
        """The module the stop-gradient teacher pass calls (always under no_grad)."""
        return self.model

    def teacher_in_grad_mode(self) -> bool:
        """Whether the teacher pass runs with autograd on (its output detached) instead of under no_grad.

        Under torch.compile a no-grad call compiles a second, inference graph whose fusions round differently
        from the student's training graph (measured on an H200: 1.4-1.7e-2 apart in bf16 at equal sigma);
        with autograd on, the teacher runs the student's graph and the two passes agree to the bit.
        """
        mode = self.execution.teacher_pass
        return mode == "student_graph" or (mode == "auto" and bool(self.execution.compile))

    def accumulate(self, last_micro_batch: bool):
        """Context for one micro-batch's forward/backward; gradient reduction happens on the last."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of all gradients (fp32, on device; no host sync)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        # Sharded gradients (FSDP2 DTensors) give a partial norm; full_tensor() reduces it over the mesh.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def autocast(self):
        """bf16 autocast when the run asks for it (auto: on CUDA only)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- state ----------------------------------------------------------------------------------
    def ema_targets(self) -> dict[str, torch.Tensor]:
        """The live parameters an evaluation EMA follows, by fully qualified name (sharded like the model)."""
        return {name: p for name, p in self.module.named_parameters()}

    @torch.no_grad()
    def eval_model(self, ema) -> nn.Module:
        """A module in eval mode (no dropout) holding the EMA weights, for sampling; every rank calls it."""
        if self._eval_copy is None:
            self._eval_copy = copy.deepcopy(self.module).eval().requires_grad_(False)
        ema.copy_to(dict(self._eval_copy.named_parameters()))
        return self._eval_copy

    def save(self, ckpt_dir: str, ema_state: dict, storage_options: dict | None = None,
             background: bool = False) -> dcp_io.PendingSave:
        """Write model, optimiser and EMA; with background=True only staging blocks (wait() before COMMIT)."""
        return dcp_io.save(ckpt_dir, self.model, self.optimizer, ema_state, storage_options, background)

    def load(self, ckpt_dir: str, ema_state: dict, storage_options: dict | None = None) -> None:
        dcp_io.load(ckpt_dir, self.model, self.optimizer, ema_state, storage_options)

    def optimizer_param_groups(self) -> list[dict]:
        """The optimiser's parameter groups built from cfg.optim (their settings follow the config on resume)."""
        return self.optimizer.param_groups


class DistributedBackend(Backend):
    """A backend with a process group: the launcher's environment says which rank this is."""

    def __init__(self, parallel: ParallelConfig, execution: ExecutionConfig, env: LaunchEnv):
        device = device_for(env.local_rank)
        init_process_group(env, device, parallel.timeout_s)
        super().__init__(parallel, execution, device, env.rank, env.world_size, env.local_rank)
