"""FSDP2 (`fully_shard`): parameters, gradients and optimiser state sharded over ranks; HSDP on a 2-D mesh.

Applied from outside, in torchtitan's order: per-block transforms (checkpointing, compile), then
`fully_shard` on every block the network lists, then on the root. Parameters become DTensors; the
EMA follows them shard for shard and DCP reshards it on load.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .backend import DistributedBackend
from .blocks import fp32_conditioning_modules, shard_units
from .eval_copy import EvalCopy


def build_mesh(device_type: str, world_size: int, shard_size: int) -> DeviceMesh:
    """1-D mesh (FSDP) or (replicate, shard) mesh (HSDP: shard within groups of `shard_size` ranks)."""
    if shard_size < 0 or shard_size > world_size or (shard_size and world_size % shard_size):
        raise ValueError(f"parallel.fsdp_shard_size={shard_size} must be 0 or a divisor of the world size "
                         f"{world_size} (for example the GPUs per node)")
    if shard_size in (0, world_size):
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    # Row-major layout: launchers number ranks node by node, so each shard group is one node's ranks
    # (fast intra-node reduce-scatter) and each replicate group takes one rank per node.
    return init_device_mesh(device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def shard_model(module: nn.Module, mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool,
                cpu_offload: bool) -> nn.Module:
    """fully_shard each block, then the root (which picks up the remaining parameters)."""
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()

    def policy(cast_inputs: bool) -> MixedPrecisionPolicy:
        if not bf16:
            return MixedPrecisionPolicy()
        # bf16 all-gathers and compute, fp32 gradient reduction (sums of many small bf16 terms drift).
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=cast_inputs)

    conditioning = fp32_conditioning_modules(module) if bf16 else []
    if conditioning:
        # The noise-level path (mapping MLP, every block's embedding projection) as ONE unit with fp32
        # parameters: bf16 would round away the difference between neighbouring sigmas (see
        # networks.layers.ConditioningLinear). It is small (~10% of the weights), so it is gathered once per
        # step and kept through the teacher, the student and the backward (no reshard after forward).
        fully_shard(conditioning, mesh=mesh, reshard_after_forward=False, offload_policy=offload,
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False))
    for block in shard_units(module):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy(True),
                    offload_policy=offload)
    # The root keeps its inputs in fp32: the consistency parameterisation computes c_skip * x in
    # fp32 (near sigma_min that term is the whole output); autocast narrows what the layers see.
    # Its parameters are needed again at once by the backward, so it never reshards after forward.
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy(False), offload_policy=offload)
    return module


class FSDPBackend(DistributedBackend):
    name = "fsdp"

    def prepare(self, module: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]) -> None:
        self._eval = EvalCopy(module)
        module = self._place(module, channels_last_weights=False)
        p = self.parallel
        self.mesh = build_mesh(self.device.type, self.world_size, p.fsdp_shard_size)
        self.module = self.model = shard_model(module, self.mesh, self.precision == "bf16",
                                               p.fsdp_reshard_after_forward, p.fsdp_cpu_offload)
        self.optimizer = make_optimizer([q for q in self.model.parameters() if q.requires_grad])

    def accumulate(self, last_micro_batch: bool):
        # Earlier micro-batches keep unsharded gradients locally; the last reduce-scatters their sum.
        self.module.set_requires_gradient_sync(last_micro_batch)
        return super().accumulate(last_micro_batch)

    @torch.no_grad()
    def eval_model(self, ema) -> nn.Module:
        # full_tensor() all-gathers each EMA shard; every rank calls eval_model, as the interface requires.
        full = {n: (t.full_tensor() if isinstance(t, DTensor) else t) for n, t in ema.state_dict().items()}
        return self._eval.load(full, self.device)
