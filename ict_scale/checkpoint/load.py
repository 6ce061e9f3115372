"""Reading a checkpoint outside a run (sample, export, evaluate): find the newest complete one (or an exported
.safetensors) and rebuild its model with the EMA weights. Any checkpoint layout ever written is read."""
from __future__ import annotations

import io
import sys

import safetensors.torch
import torch
from omegaconf import OmegaConf

from ict_scale.config import load_config
from ict_scale.data import StorageError
from ict_scale.data import storage as data_storage
from ict_scale.errors import UserError
from ict_scale.parallel import dcp_io
from ict_scale.train.model import build_model

from .layout import CONFIG, TRAINER_STATE, checkpoint_verifier
from .manager import COMMIT, CheckpointManager
from .storage import Storage


class CheckpointNotFound(UserError, FileNotFoundError):
    """No complete checkpoint (or exported model) where the command line points."""


class ExportedModelMismatch(UserError, ValueError):
    """An exported .safetensors file that does not hold the model its .yaml describes."""


def resolve_checkpoint(path: str, storage_options: dict | None = None) -> str:
    """A complete checkpoint URL from a run dir (newest complete) or a checkpoint dir (must be complete)."""
    path = path.rstrip("/")
    storage = Storage(path, storage_options)
    if storage.exists(COMMIT):
        problems = checkpoint_verifier(storage)(path)
        if problems:
            raise CheckpointNotFound(f"{path} is marked complete but is not: {'; '.join(problems[:5])}")
        return path
    if storage.exists(TRAINER_STATE):
        raise CheckpointNotFound(f"{path} is an incomplete checkpoint (no {COMMIT} marker): its save was interrupted")
    ckpts = CheckpointManager(storage, verify=checkpoint_verifier(storage))
    step = ckpts.newest_good(report=lambda note: print(note, file=sys.stderr))
    if step is None:
        raise CheckpointNotFound(f"no complete checkpoint under {path}/checkpoints (expected step_*/{COMMIT})")
    return ckpts.url(step)


def _run_config(yaml_bytes: bytes):
    """A run's saved config.yaml over today's schema defaults (keys added since then take their defaults)."""
    return OmegaConf.merge(load_config([], []), OmegaConf.load(io.StringIO(yaml_bytes.decode())))


def load_exported_model(path: str, device="cpu", storage_options: dict | None = None):
    """(ConsistencyModel in eval mode, config, path) from `python -m ict_scale.export`'s NAME.safetensors and the
    NAME.yaml written beside it."""
    parent, _, name = path.rpartition("/")
    storage = Storage(parent or ".", storage_options)
    config_name = name[:-len(".safetensors")] + ".yaml"
    if not storage.exists(name):
        raise CheckpointNotFound(f"{path}: no such file")
    if not storage.exists(config_name):
        raise CheckpointNotFound(f"{path}: its config {storage.url(config_name)} is missing (python -m ict_scale.export "
                                f"writes the two side by side)")
    cfg = _run_config(storage.read_bytes(config_name))
    model = build_model(cfg)
    tensors = safetensors.torch.load(storage.read_bytes(name))
    missing, unexpected = model.state_dict().keys() - tensors.keys(), tensors.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ExportedModelMismatch(f"{path} does not hold the model {storage.url(config_name)} describes (missing tensors: "
                         f"{sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})")
    model.load_state_dict(tensors)
    return model.to(device).eval().requires_grad_(False), cfg, path


def load_ema_model(path: str, device="cpu", storage_options: dict | None = None):
    """(ConsistencyModel in eval mode with EMA weights, resolved config, checkpoint URL or exported file)."""
    if path.endswith(".safetensors"):
        return load_exported_model(path, device, storage_options)
    try:
        ckpt = resolve_checkpoint(path, storage_options)
    except UserError:
        raise
    except Exception as e:  # nothing but storage access above: no credentials, no endpoint, bad options
        raise StorageError(f"{path}: {data_storage.describe(e)}") from e
    store = Storage(ckpt, storage_options)
    cfg = _run_config(store.read_bytes(CONFIG))
    model = build_model(cfg)
    ema = {n: torch.empty_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    dcp_io.load_ema(ckpt, ema, storage_options)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ema[n])
    return model.to(device).eval().requires_grad_(False), cfg, ckpt
