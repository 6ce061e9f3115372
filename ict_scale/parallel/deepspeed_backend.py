"""DeepSpeed ZeRO 1/2/3: the engine owns backward, the optimiser step and its checkpoint files.

The EMA follows DeepSpeed's fp32 master weights, not the bf16/fp16 copies the module computes
with: under ZeRO-1/2 each rank tracks the fragment of every parameter that its optimiser partition
owns, under ZeRO-3 its partition of each parameter. The update is local (no communication); saving
assembles full tensors and writes them through DCP beside the engine files.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import dcp_io, deepspeed_ckpt
from .backend import DistributedBackend
from .config import ExecutionConfig, ParallelConfig
from .deepspeed_config import build_ds_config, compute_dtype
from .eval_copy import EvalCopy
from .launch_env import LaunchEnv

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _z3_partition(p) -> tuple[torch.Tensor, int, int]:
    """(this rank's fp32 partition of a ZeRO-3 parameter, its offset in the flat parameter, valid length).

    Partitions have equal size on every rank; the last ones are padded past the parameter's end.
    """
    import deepspeed.utils as dsu
    local = dsu.safe_get_local_fp32_param(p)
    start = dist.get_rank(group=p.ds_process_group) * local.numel()
    return local, start, max(0, min(local.numel(), p.ds_numel - start))


def _autocast_forward(forward, device_type: str, dtype: torch.dtype, *args, **kwargs):
    with torch.autocast(device_type, dtype=dtype):
        return forward(*args, **kwargs)


def _skip_cpu_shm_build() -> None:
    # On the CPU accelerator, DeepSpeed compiles a shared-memory all-reduce op (30-80 s) on every
    # fresh machine before the first collective. gloo is all that CPU runs (tests, laptops) need, and
    # DeepSpeed consults this table of usable ops before building one.
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _drop_untested_optimizer(record) -> bool:
    # ZeRO warns on every start that a client optimiser is "untested": the recipe's RAdam is used
    # deliberately (zero_allow_untested_optimizer), and prepare() says so once itself.
    return "untested optimizer" not in record.getMessage()


def _quiet_deepspeed() -> None:
    """Silence, narrowly, DeepSpeed's messages that say nothing about this run."""
    from deepspeed.utils import logger
    logger.addFilter(_drop_untested_optimizer)
    # ZeRO gathers with torch's all_gather_into_tensor, which torch now marks deprecated: not ours to change.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning, module=r"torch\.distributed\.c10d_logger")


class DeepSpeedBackend(DistributedBackend):
    name = "deepspeed"

    def __init__(self, parallel: ParallelConfig, execution: ExecutionConfig, env: LaunchEnv, *, batch_per_gpu: int,
                 accumulation: int):
        super().__init__(parallel, execution, env)  # our process group first; DeepSpeed adopts it
        import deepspeed
        _skip_cpu_shm_build()
        _quiet_deepspeed()
        from deepspeed.accelerator import get_accelerator
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        self.ds_config = build_ds_config(parallel.deepspeed_config, batch_per_gpu=batch_per_gpu,
                                         accumulation=accumulation, world_size=self.world_size,
                                         precision=self.precision, on_gpu=self.device.type == "cuda")
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.engine = None

    def prepare(self, module: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]) -> None:
        import deepspeed
        self._eval = EvalCopy(module)
        module = self._place(module, channels_last_weights=False)
        params = [p for p in module.parameters() if p.requires_grad]
        low_precision = compute_dtype(self.ds_config) != "fp32"
        init = {n: p.detach().clone() for n, p in module.named_parameters()} if low_precision else {}
        client_optimizer = None if "optimizer" in self.ds_config else make_optimizer(params)
        if client_optimizer is not None and self.zero_stage > 0 and self.rank == 0:
            print(f"deepspeed: ZeRO-{self.zero_stage} with the recipe's torch.optim.{type(client_optimizer).__name__} "
                  "(deliberately: DeepSpeed calls any optimiser but its own untested)", flush=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=client_optimizer,
                                                                 model_parameters=params, config=self.ds_config)
        self.model, self.module = self.engine, self.engine.module
        self._param_by_name = dict(self.module.named_parameters())
        self._stepped = True
        if init:
            self._restore_fp32_init(init)
            # engine.forward switches an enclosing autocast off around the module (unless DeepSpeed's
            # own torch_autocast section is used), and the module's weights are now bf16/fp16 while
            # the parameterisation feeds it fp32: autocast is re-entered inside, around the module.
            self.module.forward = functools.partial(_autocast_forward, self.module.forward, self.device.type,
                                                    _DTYPES[compute_dtype(self.ds_config)])

    @torch.no_grad()
    def _restore_fp32_init(self, init: dict[str, torch.Tensor]) -> None:
        """Put the exact fp32 initial weights into DeepSpeed's fp32 master copy.

        In bf16/fp16 mode the engine casts the module first and builds its fp32 masters from that
        cast, so training (and the EMA) would start from rounded weights (relative error ~4e-3 in
        bf16), unlike every other backend. The low-precision copies are unchanged: they are the
        rounding of these masters either way.
        """
        import deepspeed.utils as dsu
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            full = init[name].to(self.device).flatten()
            if self.zero_stage == 3:
                # Set this rank's (padded) partition: DeepSpeed's full-tensor setter mishandles padding.
                local, start, valid = _z3_partition(p)
                value = torch.zeros_like(local)
                value[:valid] = full[start:start + valid]
                dsu.safe_set_local_fp32_param(p, value)
            else:
                dsu.safe_set_full_fp32_param(p, full.view(p.shape))

    # -- the step -------------------------------------------------------------------------------
    def teacher(self) -> nn.Module:
        # The bare module: ZeRO-3's gather/release hooks sit on the submodules themselves, so they
        # run here too, while the engine's forward bookkeeping (timers, micro-step state) is skipped.
        return self.module

    def accumulate(self, last_micro_batch: bool):
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def autocast(self):
        # The engine casts the module to its dtype; autocast makes fp32 inputs (and the fp32
        # parameterisation around the network) meet those weights without explicit casts.
        dtype = compute_dtype(self.ds_config)
        if dtype in _DTYPES:
            return torch.autocast(self.device.type, dtype=_DTYPES[dtype])
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The step already divides the loss by the number of micro-batches.
        self.engine.backward(loss, scale_wrt_gas=False)
        self._stepped = False

    def grad_norm(self) -> torch.Tensor:
        """Global norm from each rank's fp32 gradient partition (one scalar all-reduce), before the step."""
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        for p in self._params():
            g = self._local_grad(p)
            if g is not None and g.numel():
                sq += g.float().pow(2).sum()
        dist.all_reduce(sq)
        return sq.sqrt() / self._loss_scale()

    def optimizer_step(self) -> None:
        self.engine.step()
        self._stepped = True

    def zero_grad(self) -> None:
        if not self._stepped:
            self._discard_step()
        self.engine.zero_grad()

    def _discard_step(self) -> None:
        """Drop the accumulated gradients of a step the loop skipped (a non-finite loss on some rank).

        DeepSpeed keeps reduced gradients in its own partitions; its supported way to drop them is
        the overflow path of engine.step(), which skips the update, clears them on every rank and
        (fp16) lowers the loss scale. A NaN written into this rank's partition routes the step there.
        """
        import deepspeed.utils as dsu
        for p in self._params():
            if self.zero_stage == 3:
                dsu.safe_set_local_grad(p, torch.full_like(dsu.safe_get_local_grad(p), float("nan")))
                break
            if getattr(p, "_hp_mapping", None) is not None:
                dsu.safe_set_full_grad(p, torch.full(p.shape, float("nan"), device=self.device))
                break
        self.engine.step()
        self._stepped = True

    def _params(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def _local_grad(self, p):
        import deepspeed.utils as dsu
        if self.zero_stage == 3:
            return dsu.safe_get_local_grad(p)
        m = getattr(p, "_hp_mapping", None)
        if m is None:
            return None
        g = m.get_lp_grad_fragment(p._index_in_param_group)
        # Some optimiser modes keep a full-size gradient on every rank: count only the owned fragment.
        if g.numel() == p.numel() and m.lp_fragment_address.numel != p.numel():
            g = g.flatten().narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel)
        return g

    def _loss_scale(self) -> float:
        return float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0)

    # -- state ----------------------------------------------------------------------------------
    def _fragments(self) -> dict[str, tuple[torch.Tensor, int]]:
        """name -> (this rank's slice of the fp32 master weight, flattened, and its start offset)."""
        out = {}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if self.zero_stage == 3:
                local, start, valid = _z3_partition(p)
                out[name] = (local.narrow(0, 0, valid), start)
            elif getattr(p, "_hp_mapping", None) is not None:
                m = p._hp_mapping
                out[name] = (m.hp_fragment, m.lp_fragment_address.start)
            else:
                out[name] = (torch.empty(0, device=self.device), 0)
        return out

    def _full_shape(self, name: str) -> torch.Size:
        p = self._param_by_name[name]
        return p.ds_shape if self.zero_stage == 3 else p.shape  # a ZeRO-3 parameter's own shape is empty

    def ema_targets(self) -> dict[str, torch.Tensor]:
        # Rebuilt at every call: views into the optimiser's fp32 partitions (a load may replace them).
        return {name: frag for name, (frag, _) in self._fragments().items()}

    @torch.no_grad()
    def _assemble(self, shards: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full fp32 tensors from every rank's fragments (collective; each element is owned by one rank)."""
        full = {}
        for name, (_, start) in self._fragments().items():
            buf = torch.zeros(self._full_shape(name).numel(), device=self.device, dtype=torch.float32)
            frag = shards[name]
            buf.narrow(0, start, frag.numel()).copy_(frag)
            dist.all_reduce(buf)
            full[name] = buf.view(self._full_shape(name))
        return full

    @torch.no_grad()
    def eval_model(self, ema) -> nn.Module:
        return self._eval.load(self._assemble(ema.state_dict()), self.device)

    def save(self, ckpt_dir: str, ema_state: dict, storage_options: dict | None = None,
             background: bool = False) -> dcp_io.PendingSave:
        # background is accepted for interface symmetry; the engine's own save is synchronous.
        deepspeed_ckpt.save_engine(self.engine, ckpt_dir, storage_options, self.zero_stage)
        dcp_io.save_ema(ckpt_dir, self._assemble(ema_state), storage_options)
        return dcp_io.PendingSave()

    def optimizer_param_groups(self) -> list[dict]:
        # An optimizer section in the DeepSpeed config replaces the run's RAdam, and cfg.optim with it.
        return [] if "optimizer" in self.ds_config else self.optimizer.param_groups

    @torch.no_grad()
    def load(self, ckpt_dir: str, ema_state: dict, storage_options: dict | None = None) -> None:
        deepspeed_ckpt.load_engine(self.engine, ckpt_dir, storage_options, self.local_rank)
        full = {name: torch.zeros(self._full_shape(name), device=self.device) for name in ema_state}
        dcp_io.load_ema(ckpt_dir, full, storage_options)
        for name, (frag, start) in self._fragments().items():
            ema_state[name].copy_(full[name].flatten().narrow(0, start, frag.numel()))

