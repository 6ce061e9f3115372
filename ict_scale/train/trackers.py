"""Where the training metrics and sample grids go: `train.loggers` picks from jsonl, tensorboard and wandb.

Every tracker takes the same two calls, `scalars(record)` (one metrics.jsonl line) and `image(tag, png, step)`
(a sample grid); only rank 0 builds any. jsonl is metrics.jsonl in the run directory; tensorboard writes
<run_dir>/tensorboard when the package is installed (local run directories); wandb logs to Weights & Biases
(WANDB_MODE=offline keeps it on disk) with the resolved config, secrets redacted, as the run's config.
"""
from __future__ import annotations

import io
import os
import uuid

from omegaconf import OmegaConf

from ict_scale.config.load import redact

from .tensorboard import TensorBoard


class JsonlLog:
    """metrics.jsonl: one JSON object per logged step, appended to the run directory (local or s3://)."""

    def __init__(self, storage):
        self.storage = storage

    def scalars(self, record: dict) -> None:
        self.storage.append_record("metrics.jsonl", record)  # strict JSON: non-finite values as null

    def image(self, tag: str, png: bytes, step: int) -> None:
        pass  # grids are files of their own in samples/

    def close(self) -> None:
        pass


class WandbLog:
    """A Weights & Biases run; a resumed training run continues the same W&B run (its id is kept in the run dir)."""

    ID_FILE = "wandb_run_id"

    def __init__(self, cfg, storage):
        import wandb
        self.wandb = wandb
        if storage.exists(self.ID_FILE):
            run_id = storage.read_bytes(self.ID_FILE).decode().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            storage.write_text(self.ID_FILE, run_id)
        run_dir = cfg.train.run_dir
        local_dir = run_dir if "://" not in run_dir else None  # W&B keeps its files on a local disk
        self.run = wandb.init(project=cfg.train.wandb_project, name=os.path.basename(run_dir.rstrip("/")),
                              id=run_id, resume="allow", dir=local_dir,
                              config=redact(OmegaConf.to_container(cfg, resolve=True)))

    def scalars(self, record: dict) -> None:
        values = {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.run.log(values, step=record["step"])

    def image(self, tag: str, png: bytes, step: int) -> None:
        from PIL import Image
        self.run.log({tag: self.wandb.Image(Image.open(io.BytesIO(png)).convert("RGB"))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The configured trackers as one: each call goes to all of them."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def scalars(self, record: dict) -> None:
        for t in self.trackers:
            t.scalars(record)

    def image(self, tag: str, png: bytes, step: int) -> None:
        for t in self.trackers:
            t.image(tag, png, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def build_trackers(cfg, storage, enabled: bool) -> Trackers:
    """The trackers `cfg.train.loggers` names (none where `enabled` is false, i.e. on ranks other than 0)."""
    if not enabled:
        return Trackers([])
    make = {"jsonl": lambda: JsonlLog(storage), "tensorboard": lambda: TensorBoard(cfg.train.run_dir, True),
            "wandb": lambda: WandbLog(cfg, storage)}
    return Trackers([make[name]() for name in dict.fromkeys(cfg.train.loggers)])
