"""Model, optimiser and EMA state as torch.distributed.checkpoint (DCP) bytes, local or s3://.

DCP writes one shard per rank plus metadata and can be read back at any world size (resharding),
and `get_state_dict` keys optimiser state by parameter name, so a checkpoint written by one backend
or world size loads into another. The EMA is stored under "ema" with the full parameter names of
the unwrapped model, whatever the backend, so `load_ema` can always read it.
"""
from __future__ import annotations

import warnings

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_state_dict)

from .ckpt_files import SafeFileSystemReader, SafeFsspecReader

# DCP warns on every save and load without a process group that it assumes a single process, even when
# told so (no_dist=True). A single process is the smallest world here, not a mistake to point out.
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint\.",
                        message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the "
                                r"intent is to (save|load) in a single process")

_async_group = None  # a gloo group for background saves, so they never interleave with the step's collectives


class PendingSave:
    """A checkpoint write in flight (or finished); wait() returns once this rank's bytes are durable."""

    def __init__(self, future=None):
        self._future = future

    def wait(self) -> None:
        if self._future is not None:
            self._future.result()  # re-raises a failed background write here, on the caller's thread
            self._future = None


def _storage(path: str, storage_options: dict | None, write: bool):
    # Readers unpickle .metadata through an allow-list of DCP's own types (see ckpt_files).
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        opts = dict(storage_options or {})
        return FsspecWriter(path, **opts) if write else SafeFsspecReader(path, **opts)
    local = path.removeprefix("file://")
    return dcp.FileSystemWriter(local) if write else SafeFileSystemReader(local)


def _write(state: dict, path: str, storage_options: dict | None, background: bool) -> PendingSave:
    global _async_group
    writer = _storage(path, storage_options, write=True)
    if not background:
        dcp.save(state, storage_writer=writer)
        return PendingSave()
    if _async_group is None and dist.is_initialized():
        _async_group = dist.new_group(backend="gloo")  # collective: every rank reaches its first background save
    # async_save copies the state to CPU before returning; only the write happens in the background.
    return PendingSave(dcp.async_save(state, storage_writer=writer, process_group=_async_group))


def save(path: str, model, optimizer, ema_state: dict, storage_options: dict | None = None,
         background: bool = False) -> PendingSave:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema_state}
    return _write(state, path, storage_options, background)


def save_ema(path: str, ema_state: dict, storage_options: dict | None = None) -> None:
    """Only the EMA (full tensors by name); for backends whose model and optimiser use another format."""
    _write({"ema": ema_state}, path, storage_options, background=False)


def load(path: str, model, optimizer, ema_state: dict, storage_options: dict | None = None) -> None:
    """Load in place: `ema_state` tensors are filled, model and optimiser are set."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema_state}
    dcp.load(state, storage_reader=_storage(path, storage_options, write=False))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=True))


def load_ema(path: str, ema_state: dict, storage_options: dict | None = None) -> None:
    """Fill `ema_state` (full, unsharded tensors by name) from a checkpoint written at any world size."""
    state = {"ema": ema_state}
    dcp.load(state, storage_reader=_storage(path, storage_options, write=False))


def load_model_weights(path: str, weights: dict, storage_options: dict | None = None) -> None:
    """Fill `weights` (full tensors by parameter name) with the "model" entry of a DCP checkpoint."""
    state = {"model": weights}
    dcp.load(state, storage_reader=_storage(path, storage_options, write=False))

