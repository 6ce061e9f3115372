"""The files of one checkpoint directory beside the backend's bytes, and how run state is laid out in them.

    checkpoints/step_000000123/
        trainer_state.pt   the host pieces by name, the data fingerprint and the world size (rank 0 writes it)
        config.yaml        the run's resolved config at that step (the resume check reads it)
        .metadata, *.distcp (or engine/, deepspeed.json)   model, optimiser and the sharded pieces
        COMMIT             written last, once every file above is verified

The sharded pieces share the backend's flat tensor dict (DCP key "ema"): the evaluation EMA under its
parameter names, so that `dcp_io.load_ema` reads it the same way whatever the backend, every other piece
under "<name>/" (e.g. "teacher/net.enc.0.weight").
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from ict_scale.parallel import ckpt_files

from .storage import Storage, torch_bytes

TRAINER_STATE = "trainer_state.pt"
CONFIG = "config.yaml"
RUN_FILES = (TRAINER_STATE, CONFIG)  # the files a checkpoint needs beside its bytes
FORMAT = 2  # trainer_state.pt layouts: 1 (no "format" key) kept the counters at the top level

EMA_PIECE = "ema"  # the sharded piece stored under bare parameter names


def tensor_prefix(piece: str) -> str:
    return "" if piece == EMA_PIECE else f"{piece}/"


TEACHER_PREFIX = tensor_prefix("teacher")


@dataclass
class TrainerState:
    """What trainer_state.pt holds: each host piece's state by name, and what identifies the run's data."""
    pieces: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_fingerprint: str | None = None
    world_size: int = 1

    def to_bytes(self) -> bytes:
        return torch_bytes({"format": FORMAT, "pieces": self.pieces, "data_fingerprint": self.data_fingerprint,
                            "world_size": self.world_size})

    @classmethod
    def from_bytes(cls, data: bytes) -> "TrainerState":
        # weights_only: a run directory writable by others must not be able to make the trainer run code.
        state = torch.load(io.BytesIO(data), weights_only=True)
        if "format" not in state:
            return cls.from_layout_1(state)
        return cls(state["pieces"], state.get("data_fingerprint"), int(state.get("world_size", 1)))

    @classmethod
    def from_layout_1(cls, state: dict) -> "TrainerState":
        """Checkpoints written before the pieces had names: the counters at the top level (the trainer's
        "progress" piece), the data loader's state under "loader" (its fingerprint inside)."""
        progress = {k: int(state.get(k, 0)) for k in ("step", "images_seen", "nonfinite_total", "nonfinite_run")}
        loader = state["loader"]
        return cls({"progress": progress, "loader": loader}, loader.get("fingerprint"),
                   int(state.get("world_size", 1)))


def read_trainer_state(storage: Storage, name: str) -> TrainerState:
    return TrainerState.from_bytes(storage.read_bytes(f"{name}/{TRAINER_STATE}"))


def checkpoint_verifier(storage: Storage):
    """What keeps a checkpoint URL from being complete: the run's files and every file its bytes need."""
    return lambda url: ckpt_files.checkpoint_problems(url, storage.storage_options, required=RUN_FILES)
