"""DistributedDataParallel: full replicas, gradients all-reduced in buckets on the last micro-batch."""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .backend import DistributedBackend


class DDPBackend(DistributedBackend):
    name = "ddp"

    def prepare(self, module: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]) -> None:
        self.module = self._place(module)
        # Gradients live in DDP's buckets from the start (gradient_as_bucket_view) and are zeroed in place,
        # never set to None: backward then accumulates straight into the bucket. A gradient set to None
        # would instead be replaced by whatever autograd produced, e.g. a 1x1 convolution's weight
        # gradient under autocast, whose strides differ from the weight's in its size-1 dimensions:
        # DDP then copies it into the bucket and warns that the grad strides do not match.
        self._zero_missing_grads()
        # No per-forward buffer sync: the only buffers are constants built identically on every rank
        # (Fourier frequencies from the shared seed, FIR taps). DDP still broadcasts rank 0's
        # parameters (and these buffers) once here.
        self.model = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                         bucket_cap_mb=self.parallel.ddp_bucket_cap_mb, gradient_as_bucket_view=True,
                         **_no_forward_buffer_sync())
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)  # keep the bucket views (see prepare)

    def _zero_missing_grads(self) -> None:
        for p in self.module.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    @contextlib.contextmanager
    def _optimizer_state_initialisable(self):
        """torch's get_state_dict gives an optimiser that has not stepped yet its state (so that a checkpoint
        can fill it) by a step with zero gradients, but only where no gradient exists; ours always do.
        Without this, a resumed run would load no optimiser state at all."""
        if not self.optimizer.state:
            self.optimizer.zero_grad(set_to_none=True)
        try:
            yield
        finally:
            self._zero_missing_grads()  # DDP links them to its buckets again in the next backward

    def save(self, *args, **kwargs):
        with self._optimizer_state_initialisable():
            return super().save(*args, **kwargs)

    def load(self, *args, **kwargs) -> None:
        with self._optimizer_state_initialisable():
            super().load(*args, **kwargs)

    def teacher(self) -> nn.Module:
        # The unwrapped module: DDP's forward would prepare the reducer for a backward that never
        # comes (the teacher runs under no_grad); calling the module skips DDP's bookkeeping entirely.
        return self.module

    def accumulate(self, last_micro_batch: bool):
        # Only the last micro-batch's backward all-reduces; the others accumulate locally.
        return contextlib.nullcontext() if last_micro_batch else self.model.no_sync()


def _no_forward_buffer_sync() -> dict:
    """DDP's keyword for "no buffer sync before each forward": newer torch renamed it (and warns on the old one)."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
