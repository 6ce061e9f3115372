"""A plain, full-size copy of the model for sampling with EMA weights, for backends that shard parameters.

Sampling runs a few hundred forwards every few thousand steps; a full copy per rank (fp32) is
simpler and faster there than driving the sharded model in eval mode.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EvalCopy:
    def __init__(self, module: nn.Module):
        # Taken before any wrapping or sharding: a parameter-less (meta) skeleton plus the buffers,
        # which are small constants (Fourier frequencies, FIR taps) that no backend shards.
        self._skeleton = copy.deepcopy(module).to("meta")
        self._buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        self._model: nn.Module | None = None

    @torch.no_grad()
    def load(self, full_params: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
        """The copy on `device` in eval mode, holding `full_params` (full tensors by parameter name)."""
        if self._model is None:
            self._model = self._skeleton.to_empty(device=device).eval().requires_grad_(False)
            for name, b in self._model.named_buffers():
                b.copy_(self._buffers[name])
        params = dict(self._model.named_parameters())
        missing = sorted(set(params) - set(full_params))
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for name, p in params.items():
            p.copy_(full_params[name])
        return self._model
