"""Training data: synthetic or WebDataset shards (local or s3://), streamed in a resumable global order.

    loader = build_loader(cfg.data, batch_per_rank=128, rank=r, world_size=w, seed=0)
    images, labels = next(loader)        # uint8 (B, 3, R, R), int64 (B,)
    state = loader.state_dict()          # identical on every rank; rank 0's copy resumes any world size
    loader.load_state_dict(state)        # continues with exactly the next samples
"""
from __future__ import annotations

from ict_scale.data import sources, storage
from ict_scale.data.config import DataConfig, label_dim
from ict_scale.data.loader import StreamingLoader
from ict_scale.data.producers import DataError, ShardProducer, SyntheticProducer
from ict_scale.data.storage import StorageError
from ict_scale.errors import ConfigError

__all__ = ["DataConfig", "DataError", "StorageError", "StreamingLoader", "build_loader", "label_dim"]


def _check_compatible(cfg: DataConfig, shards: sources.ShardSet, source: str) -> None:
    """The config's resolution and class count must match what the manifest says the shards hold."""
    if shards.image_shape is not None and list(shards.image_shape) != [3, cfg.resolution, cfg.resolution]:
        raise ConfigError(f"{source}: shards hold images of shape {shards.image_shape}, "
                         f"but data.resolution={cfg.resolution}")
    if shards.num_classes is not None and cfg.num_classes > 0 and shards.num_classes != cfg.num_classes:
        hint = "set data.num_classes=0 (unlabelled shards)" if shards.num_classes == 0 else \
            f"set data.num_classes={shards.num_classes} (or 0 to ignore labels)"
        raise ConfigError(f"{source}: shards have {shards.num_classes} classes but data.num_classes="
                         f"{cfg.num_classes}; {hint}")


def _producer(cfg: DataConfig, seed: int):
    use_labels = label_dim(cfg) > 0
    if cfg.source == "synthetic":
        fingerprint = f"synthetic:{cfg.synthetic_seed}:{cfg.resolution}:{cfg.num_classes}"
        return SyntheticProducer(cfg.resolution, cfg.num_classes, use_labels, cfg.synthetic_seed), 0, fingerprint
    options = storage.plain(cfg.storage_options)
    shards = sources.resolve(cfg.source, options, cfg.allow_pipe)
    _check_compatible(cfg, shards, cfg.source)
    if cfg.check_shards:
        sources.check_present(shards, options)
    # A data set smaller than the minimum is judged after one epoch's worth of samples per worker.
    min_samples = min(cfg.min_samples_for_skip_rate, sum(shards.sizes))
    producer = ShardProducer(
        shards, order_seed=seed, shuffle=cfg.shuffle, resolution=cfg.resolution,
        num_classes=cfg.num_classes, use_labels=use_labels, storage_options=options,
        allow_pipe=cfg.allow_pipe, prefetch_shards=cfg.prefetch_shards, io_retries=cfg.io_retries,
        io_backoff_s=cfg.io_backoff_s, max_skip_rate=cfg.max_skip_rate,
        min_samples_for_skip_rate=min_samples)
    return producer, sum(shards.sizes), shards.fingerprint


def build_loader(cfg: DataConfig, *, batch_per_rank: int, rank: int, world_size: int, seed: int) -> StreamingLoader:
    """This rank's infinite, resumable stream of (images, labels); see the module docstring."""
    producer, epoch_size, fingerprint = _producer(cfg, seed)
    return StreamingLoader(
        producer, batch_per_rank=batch_per_rank, rank=rank, world_size=world_size, seed=seed,
        epoch_size=epoch_size, fingerprint=fingerprint, hflip=cfg.hflip, num_workers=cfg.num_workers,
        prefetch_batches=cfg.prefetch_batches, worker_start_method=cfg.worker_start_method,
        pin_memory=cfg.pin_memory)
