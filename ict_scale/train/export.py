"""Find a checkpoint, rebuild its model with the EMA weights, and write them out as safetensors."""
from __future__ import annotations

import io
import sys

import torch
from omegaconf import OmegaConf

from ict_scale.checkpoint import COMMIT, CheckpointManager, Storage
from ict_scale.config import load_config
from ict_scale.parallel import dcp_io

from .model import build_model


def resolve_checkpoint(path: str, storage_options: dict | None = None) -> str:
    """A complete checkpoint URL from a run dir (newest complete) or a checkpoint dir (must be complete)."""
    from .run import checkpoint_verifier
    path = path.rstrip("/")
    storage = Storage(path, storage_options)
    if storage.exists(COMMIT):
        problems = checkpoint_verifier(storage)(path)
        if problems:
            raise FileNotFoundError(f"{path} is marked complete but is not: {'; '.join(problems[:5])}")
        return path
    if storage.exists("trainer_state.pt"):
        raise FileNotFoundError(f"{path} is an incomplete checkpoint (no {COMMIT} marker): its save was interrupted")
    ckpts = CheckpointManager(storage, verify=checkpoint_verifier(storage))
    step = ckpts.newest_good(report=lambda note: print(note, file=sys.stderr))
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}/checkpoints (expected step_*/{COMMIT})")
    return ckpts.url(step)


def load_ema_model(path: str, device="cpu", storage_options: dict | None = None):
    """(ConsistencyModel in eval mode with EMA weights, resolved config, checkpoint URL)."""
    ckpt = resolve_checkpoint(path, storage_options)
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
