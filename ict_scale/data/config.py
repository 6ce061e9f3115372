"""The data section of the run configuration (composed into the top-level schema as `data`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Literal

WorkerStartMethod = Literal["", "fork", "spawn", "forkserver"]


@dataclass
class DataConfig:
    """Where training images come from and how they are streamed; a field's comment is its documentation."""
    source: str = "synthetic"          # "synthetic" | manifest.json path/URL | brace pattern of .tar shards | local shard dir
    resolution: int = 32               # image side R; every decoded image must be R x R (others are skipped)
    num_classes: int = 10              # class count; 0 = unconditional (labels are all zeros)
    drop_labels: bool = False          # deliver zero labels even when the shards carry classes
    hflip: bool = True                 # random horizontal flip, seeded per sample position; turn off for digits or text
    num_workers: int = 2               # DataLoader worker processes per rank (0 = decode in the main process)
    shuffle: bool = True               # per-epoch shard permutation + within-shard shuffle (our shuffle buffer)
    prefetch_shards: int = 4           # shards each worker downloads ahead of use (background threads)
    prefetch_batches: int = 2          # batches each worker keeps ready (DataLoader prefetch_factor)
    storage_options: Dict[str, Any] = field(default_factory=dict)  # fsspec options, e.g. {client_kwargs: {endpoint_url: ...}}; secrets from AWS_* env
    allow_pipe: bool = False           # accept "pipe:" shard URLs (they run a shell command; off for safety)
    max_skip_rate: float = 0.01        # raise once skipped / read samples exceeds this (per worker)
    min_samples_for_skip_rate: int = 1000  # reads per worker before max_skip_rate applies (at most one epoch); a shorter run is never stopped
    io_retries: int = 5                # attempts per shard read on transient storage errors (backoff doubles)
    io_backoff_s: float = 0.5          # first retry delay in seconds
    check_shards: bool = True          # list storage at start: a missing or resized shard fails fast
    synthetic_seed: int = 0            # identity of the procedural data set (source=synthetic)
    worker_start_method: WorkerStartMethod = ""  # "" (torch default) | fork | spawn | forkserver
    pin_memory: bool = True            # page-locked batches when CUDA is present (faster host-to-device copy)


def label_dim(cfg: DataConfig) -> int:
    """The label count the network conditions on and the data delivers: 0 (unconditional) when the data set has
    no classes or data.drop_labels is set. The one place this is decided."""
    return 0 if cfg.drop_labels else int(cfg.num_classes)
