"""What a checkpoint's bytes are made of: DCP's `.metadata` read without running code, and the files a
complete checkpoint needs (so that none is marked complete, or resumed, with a file missing or cut short).

DCP pickles its `.metadata`, and `pickle.load` runs whatever a crafted file asks for. The metadata holds
only DCP's own dataclasses, torch sizes, dtypes and layouts, and paths, so it is read with an unpickler
that resolves exactly those names and refuses any other (a run directory writable by others then cannot
make the trainer, `sample` or `export` run code through it).
"""
from __future__ import annotations

import json
import pathlib
import pickle
import re

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

from ict_scale.urls import url_to_fs

DCP_METADATA = ".metadata"
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}


class MetadataUnpickler(pickle.Unpickler):
    """Resolves only the names DCP metadata consists of; anything else is an UnpicklingError."""

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            return super().find_class(module, name)
        if (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"),
                              ("collections", "OrderedDict")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        if module == "pathlib" and name in _PATHS:
            return getattr(pathlib, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata "
                                     "(only DCP's own metadata types are loaded)")


def load_metadata(stream):
    """DCP's Metadata from an open binary stream, through MetadataUnpickler."""
    metadata = MetadataUnpickler(stream).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"checkpoint metadata holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class _SafeMetadata:
    """DCP readers whose read_metadata goes through MetadataUnpickler (the rest is the library's)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFileSystemReader(_SafeMetadata, dcp.FileSystemReader):
    pass


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    pass


# -- the files a complete checkpoint needs -------------------------------------------------------------
def _listing(fs, base: str) -> dict[str, int]:
    """relative path -> size of every file under `base` (one recursive listing)."""
    fs.invalidate_cache(base)  # object stores: a listing cached before the save would hide its files
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    prefix = base.rstrip("/") + "/"
    return {path[len(prefix):] if path.startswith(prefix) else path: int(info.get("size") or 0)
            for path, info in found.items() if info.get("type", "file") != "directory"}


def _dcp_problems(fs, base: str, files: dict[str, int]) -> list[str]:
    if DCP_METADATA not in files:
        return [f"{DCP_METADATA} is missing"]
    try:
        with fs.open(f"{base}/{DCP_METADATA}", "rb") as stream:
            metadata = load_metadata(stream)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        return [f"{DCP_METADATA} is unreadable ({e})"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for rel, end in sorted(needed.items()):
        if rel not in files:
            problems.append(f"{rel} (listed in {DCP_METADATA}) is missing")
        elif files[rel] < end:
            problems.append(f"{rel} is cut short ({files[rel]} bytes, {DCP_METADATA} needs {end})")
    return problems


_OPTIM = re.compile(r"^engine/(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_MODEL = re.compile(r"^engine/.*model_states\.pt$")


def _deepspeed_problems(fs, base: str, files: dict[str, int]) -> list[str]:
    """The DeepSpeed engine's files: a model-states file and one optimiser partition per rank at save time."""
    meta = json.loads(fs.cat_file(f"{base}/deepspeed.json"))
    ranks = {int(m.group(1)) for rel in files if (m := _OPTIM.match(rel))}
    problems = [] if any(_MODEL.match(rel) for rel in files) else ["engine/*model_states.pt is missing"]
    missing = sorted(set(range(int(meta["world_size"]))) - ranks)
    if missing:
        problems.append(f"optimiser partitions of ranks {missing} are missing in engine/")
    return problems + [f"{rel} is empty" for rel, size in files.items() if rel.startswith("engine/") and not size]


def checkpoint_problems(url: str, storage_options: dict | None = None,
                        required: tuple[str, ...] = ()) -> list[str]:
    """What keeps the checkpoint at `url` from being complete; empty when every file it needs is there.

    `required`: further files the run itself writes (trainer state, config). DCP's .metadata names every
    data file and the byte range of each entry in it; DeepSpeed's engine files are counted per rank.
    """
    fs, base = url_to_fs(url.removeprefix("file://"), storage_options)
    base = base.rstrip("/")
    files = _listing(fs, base)
    problems = [f"{rel} is missing" for rel in required if rel not in files]
    problems += _dcp_problems(fs, base, files)
    if "deepspeed.json" in files:
        problems += _deepspeed_problems(fs, base, files)
    return problems
