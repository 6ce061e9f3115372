"""Find a checkpoint, rebuild its model with the EMA weights, and write them out as safetensors."""
from __future__ import annotations

import io

import torch
from omegaconf import OmegaConf

from ict_scale.checkpoint import COMMIT, CheckpointManager, Storage
from ict_scale.config import load_config
from ict_scale.data import StorageError
from ict_scale.data import storage as data_storage
from ict_scale.errors import UserError
from ict_scale.parallel import dcp_io

from .model import build_model


class CheckpointNotFound(UserError, FileNotFoundError):
    """No complete checkpoint where the command line points."""


def resolve_checkpoint(path: str, storage_options: dict | None = None) -> str:
    """A complete checkpoint URL from a run dir (newest complete) or a checkpoint dir (must be complete)."""
    path = path.rstrip("/")
    storage = Storage(path, storage_options)
    if storage.exists(COMMIT):
        return path
    if storage.exists("trainer_state.pt"):
        raise CheckpointNotFound(f"{path} is an incomplete checkpoint (no {COMMIT} marker): its save was interrupted")
    step = CheckpointManager(storage).latest()
    if step is None:
        raise CheckpointNotFound(f"no complete checkpoint under {path}/checkpoints (expected step_*/{COMMIT})")
    return CheckpointManager(storage).url(step)


def load_ema_model(path: str, device="cpu", storage_options: dict | None = None):
    """(ConsistencyModel in eval mode with EMA weights, resolved config, checkpoint URL)."""
    try:
        ckpt = resolve_checkpoint(path, storage_options)
    except UserError:
        raise
    except Exception as e:  # nothing but storage access above: no credentials, no endpoint, bad options
        raise StorageError(f"{path}: {data_storage.describe(e)}") from e
    store = Storage(ckpt, storage_options)
    cfg_file = io.StringIO(store.read_bytes("config.yaml").decode())
    cfg = load_config([], [])
    cfg = OmegaConf.merge(cfg, OmegaConf.load(cfg_file))
    model = build_model(cfg)
    ema = {n: torch.empty_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    dcp_io.load_ema(ckpt, ema, storage_options)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ema[n])
    return model.to(device).eval().requires_grad_(False), cfg, ckpt
