"""DistributedDataParallel: full replicas, gradients all-reduced in buckets on the last micro-batch."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .backend import DistributedBackend


class DDPBackend(DistributedBackend):
    name = "ddp"

    def prepare(self, module: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]) -> None:
        self.module = self.place(module)
        # broadcast_buffers=False: the only buffers are constants built identically on every rank
        # (Fourier frequencies from the shared seed, FIR taps), so a per-forward broadcast buys nothing.
        # DDP still broadcasts rank 0's parameters once here.
        self.model = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                         bucket_cap_mb=self.cfg.parallel.ddp_bucket_cap_mb, broadcast_buffers=False,
                         gradient_as_bucket_view=True)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def teacher(self) -> nn.Module:
        # The unwrapped module: DDP's forward would prepare the reducer for a backward that never
        # comes (the teacher runs under no_grad); calling the module skips DDP's bookkeeping entirely.
        return self.module

    def accumulate(self, last_micro_batch: bool):
        # Only the last micro-batch's backward all-reduces; the others accumulate locally.
        return contextlib.nullcontext() if last_micro_batch else self.model.no_sync()
