"""What a piece of run state offers the Checkpointer (torch.distributed.checkpoint's `Stateful`, by shape).

Two kinds of pieces, by where their bytes go:
- host state (counters, the data loader's position, anything small and identical on every rank):
  `state_dict()` is called on every rank (it may be a collective, e.g. summing counters over ranks); rank 0's
  result is written into trainer_state.pt and every rank loads it. Values must be what `torch.load(...,
  weights_only=True)` builds: numbers, strings, lists, dicts, tensors.
- sharded tensors (the evaluation EMA, the EMA teacher): `state_dict()` returns the live tensors, shaped
  and sharded like the model's parameters; they are written with the model's bytes (resharded on load at
  any world size), filled in place on restore, then handed to `load_state_dict`.

The model and optimiser are the backend's: their bytes have formats of their own (DCP, the DeepSpeed
engine's files), so the backend offers `save`/`load` of a checkpoint URL instead (`ShardedModel`).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PendingWrite(Protocol):
    def wait(self) -> None:
        """Return once this rank's bytes are durable (re-raising a failed background write)."""


class ShardedModel(Protocol):
    """The backend's model and optimiser as bytes (parallel/: DCP or the DeepSpeed engine)."""

    def save(self, url: str, tensors: dict[str, torch.Tensor], storage_options: dict | None = None,
             background: bool = False) -> PendingWrite:
        """Every rank writes its part of model, optimiser and `tensors` (the sharded pieces, by flat key)."""

    def load(self, url: str, tensors: dict[str, torch.Tensor], storage_options: dict | None = None) -> None:
        """Set model and optimiser; fill `tensors` in place."""

    def optimizer_param_groups(self) -> list[dict]:
        """The optimiser's parameter groups built from cfg.optim (their settings follow the config on resume)."""
