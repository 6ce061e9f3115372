"""DeepSpeed engine checkpoints inside a run's checkpoint directory, local or s3://, at any world size.

Layout of one checkpoint directory (the Checkpointer adds trainer_state.pt, config.yaml and COMMIT):
    engine/           the engine's own files (model states, one ZeRO partition file per rank)
    deepspeed.json    world size and ZeRO stage at save time
    .metadata, *.distcp   the EMA through DCP, so `dcp_io.load_ema` reads it like any other backend's

DeepSpeed unpickles its files with `weights_only=False`, which runs whatever a crafted file asks for. Loads
of the engine's files at the same world size go through `safe_load` instead (tensors plus the few DeepSpeed
types its files hold); before a conversion to the universal format (whose tools unpickle freely) every
engine file is first read the same safe way, so a file that needs anything else is refused either way.

The engine writes only to local disk, so a remote checkpoint is staged: each rank saves into a
private temporary directory and uploads what it wrote; loading downloads into a node-local
directory. Loading at another world size converts to DeepSpeed's universal format first
(`deepspeed.checkpoint.ds_to_universal`), which reshards parameters and optimiser state exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid

import torch
import torch.distributed as dist

from ict_scale.urls import url_to_fs

ENGINE_TAG = "engine"
UNIVERSAL_TAG = "universal"
META = "deepspeed.json"
# Saved with the engine state: it asks DeepSpeed to record the parameter layout that ds_to_universal
# needs (without it, ZeRO-1/2 checkpoints cannot be converted).
CLIENT_STATE = {"universal_checkpoint_info": {}}


def _safe_types() -> list:
    """The non-tensor types DeepSpeed's model and optimiser files hold (ZeRO 1-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None):
    """torch.load that builds only tensors, containers and `_safe_types()`; anything else is refused."""
    with torch.serialization.safe_globals(_safe_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).split("\n\n")[-1].strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise pickle.UnpicklingError(f"{path}: refusing to load a DeepSpeed checkpoint file that needs more "
                                         f"than tensors and DeepSpeed's own state types ({first})") from None


def check_engine_files(directory: str) -> None:
    """Read every engine file under `directory` with safe_load (before tools that unpickle freely see them)."""
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(".pt"):
                safe_load(os.path.join(root, name), map_location="cpu")


@contextlib.contextmanager
def _weights_only(engine):
    """The engine's checkpoint engine loads through safe_load for the duration."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = safe_load  # an instance attribute shadows the class's unpickling load
    try:
        yield
    finally:
        del checkpoint_engine.load


def _remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _fs(url: str, storage_options: dict | None):
    return url_to_fs(url, storage_options)


def _upload_tree(local_dir: str, url: str, storage_options: dict | None) -> None:
    fs, base = _fs(url, storage_options)
    for root, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            fs.put_file(path, f"{base}/{os.path.relpath(path, local_dir)}")


def _download_tree(url: str, sub: str, local_dir: str, storage_options: dict | None) -> None:
    fs, base = _fs(url, storage_options)
    for path in fs.find(f"{base}/{sub}"):
        dest = os.path.join(local_dir, os.path.relpath(path, base))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(path, dest)


def save_engine(engine, url: str, storage_options: dict | None, zero_stage: int) -> None:
    """Every rank calls this; rank 0 also writes deepspeed.json."""
    if _remote(url):
        with tempfile.TemporaryDirectory(prefix="ict_scale_ds_") as staging:
            engine.save_checkpoint(staging, tag=ENGINE_TAG, client_state=CLIENT_STATE, save_latest=False)
            _upload_tree(staging, url, storage_options)
    else:
        engine.save_checkpoint(url.removeprefix("file://"), tag=ENGINE_TAG, client_state=CLIENT_STATE,
                               save_latest=False)
    if dist.get_rank() == 0:
        fs, base = _fs(url, storage_options)
        fs.pipe_file(f"{base}/{META}", json.dumps({"world_size": dist.get_world_size(),
                                                  "zero_stage": zero_stage}).encode())


@contextlib.contextmanager
def _node_dir(local_rank: int):
    """A temporary directory with the same path on every node, created and removed by local rank 0."""
    holder = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    path = os.path.join(tempfile.gettempdir(), f"ict_scale_ds_{holder[0]}")
    if local_rank == 0:
        os.makedirs(path)
    dist.barrier()
    try:
        yield path
    finally:
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(path, ignore_errors=True)


def _to_universal(src: str, dest: str) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
           "--output_folder", dest, "--num_extract_workers", "2", "--num_merge_workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting the DeepSpeed checkpoint {src} to the universal format failed "
                           f"(exit {done.returncode}):\n{done.stderr[-3000:]}")


def read_meta(url: str, storage_options: dict | None) -> dict:
    fs, base = _fs(url, storage_options)
    try:
        return json.loads(fs.cat_file(f"{base}/{META}"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} holds no {META}: it was not written by the deepspeed backend "
                                "(a DCP checkpoint of single/ddp/fsdp cannot seed a DeepSpeed engine)") from None


def load_engine(engine, url: str, storage_options: dict | None, local_rank: int) -> None:
    """Restore parameters and optimiser state; converts through the universal format if the world size changed."""
    meta = read_meta(url, storage_options)
    same_world = meta["world_size"] == dist.get_world_size()
    if same_world and not _remote(url):
        _load(engine, url.removeprefix("file://"), ENGINE_TAG)
        return
    with _node_dir(local_rank) as work:
        src = url.removeprefix("file://")
        if _remote(url):
            src = os.path.join(work, "src")
            if local_rank == 0:
                _download_tree(url, ENGINE_TAG, src, storage_options)
            dist.barrier()
        if same_world:
            _load(engine, src, ENGINE_TAG)
            return
        if local_rank == 0:
            check_engine_files(os.path.join(src, ENGINE_TAG))
            _to_universal(os.path.join(src, ENGINE_TAG), os.path.join(work, UNIVERSAL_TAG))
        dist.barrier()
        # The engine reads this flag (normally fixed by the config at initialize) when it loads;
        # it is set only for this one load, so later saves stay in the ordinary format.
        engine._config.load_universal_checkpoint = True
        try:
            _load(engine, work, UNIVERSAL_TAG)
        finally:
            engine._config.load_universal_checkpoint = False


def _load(engine, load_dir: str, tag: str) -> None:
    with _weights_only(engine):
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint '{tag}' under {load_dir}")
