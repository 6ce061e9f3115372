"""DeepSpeed engine checkpoints inside a run's checkpoint directory, local or s3://, at any world size.

Layout of one checkpoint directory (the run adds trainer_state.pt, config.yaml and COMMIT):
    engine/           the engine's own files (model states, one ZeRO partition file per rank)
    deepspeed.json    world size and ZeRO stage at save time
    .metadata, *.distcp   the EMA through DCP, so `dcp_io.load_ema` reads it like any other backend's

The engine writes only to local disk, so a remote checkpoint is staged: each rank saves into a
private temporary directory and uploads what it wrote; loading downloads into a node-local
directory. Loading at another world size converts to DeepSpeed's universal format first
(`deepspeed.checkpoint.ds_to_universal`), which reshards parameters and optimiser state exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import fsspec
import torch.distributed as dist

ENGINE_TAG = "engine"
UNIVERSAL_TAG = "universal"
META = "deepspeed.json"
# Saved with the engine state: it asks DeepSpeed to record the parameter layout that ds_to_universal
# needs (without it, ZeRO-1/2 checkpoints cannot be converted).
CLIENT_STATE = {"universal_checkpoint_info": {}}


def _remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _fs(url: str, storage_options: dict | None):
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


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
    path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint '{tag}' under {load_dir}")
