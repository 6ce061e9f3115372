"""train.loggers: metrics and sample grids reach TensorBoard's event files and an offline W&B run, read back with
each tool's own reader; unknown names and a missing wandb package are refused before training starts."""
import glob
import io
import json
import os
import struct

import numpy as np
import pytest
import yaml
from PIL import Image

from ict_scale.config import ConfigError, load_config
from ict_scale.train.loop import train

TINY = ["model.name=ncsnpp", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1",
        "model.attn_resolutions=[]", "model.dropout=0", "data.source=synthetic", "data.resolution=8",
        "data.num_classes=4", "data.num_workers=0", "data.drop_labels=true", "train.batch_size=4",
        "train.batch_per_gpu=4", "train.total_steps=4", "train.log_every=2", "train.grid_every=2",
        "train.grid_num=4", "train.ckpt_every=100", "ict.s1=40"]


def metrics(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_tensorboard_event_files_hold_the_scalars_and_the_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    train(load_config([], TINY + [f"train.run_dir={run_dir}"]))  # the default loggers: jsonl and tensorboard
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = metrics(run_dir)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in logged] == [2, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert [e.value for e in events.Scalars("train/num_scales")] == [r["num_scales"] for r in logged]
    for steps in (1, 2):
        grids = events.Images(f"samples/{steps}step")
        assert [g.step for g in grids] == [2, 4]
        png = (run_dir / "samples" / f"step_000000004_{steps}step.png").read_bytes()
        assert np.array_equal(pixels(grids[-1].encoded_image_string), pixels(png))


def wandb_records(path):
    """The records of W&B's transaction log (run-ID.wandb): a 7-byte header (':W&B', magic, version), then
    LevelDB-log chunks (crc32, length, type) in 32 KiB blocks, each whole record a `wandb_internal.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(pb.Record.FromString(chunks))
            chunks = b""
    return records


def test_wandb_offline_run_has_the_redacted_config_and_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    run_dir = tmp_path / "run"
    train(load_config([], TINY + [f"train.run_dir={run_dir}", "train.total_steps=2",
                                  "train.loggers=[jsonl,wandb]", "data.storage_options={secret: s3cr3t}"]))
    import wandb
    wandb.teardown()  # what the end of the training process does: W&B's service writes out the run's log
    (log,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(log)
    assert records[-1].HasField("exit")  # the whole run is on disk
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {u.key: yaml.safe_load(u.value_json) for u in run.config.update}
    assert config["train"]["total_steps"] == 2 and config["model"]["name"] == "ncsnpp"
    assert config["data"]["storage_options"] == {"secret": "<redacted>"}
    for path in glob.glob(str(run_dir / "wandb" / "**"), recursive=True):  # the secret is in no file W&B wrote
        assert os.path.isdir(path) or b"s3cr3t" not in open(path, "rb").read()
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    (row,) = [h for h in history if "train/loss" in h]  # log_every=2: one metrics line and the grids, at step 2
    assert row["_step"] == 2 and row["train/loss"] == pytest.approx(metrics(run_dir)[0]["loss"], rel=1e-12)
    (files,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files"))
    logged_grid = open(f"{files}/{row['samples/1step/path']}", "rb").read()
    assert np.array_equal(pixels(logged_grid), pixels((run_dir / "samples" / "latest_1step.png").read_bytes()))
    assert not (run_dir / "tensorboard").exists()  # tensorboard is not in this run's list


def test_logger_names_are_checked():
    with pytest.raises(ConfigError, match="'train.loggers' entries must be from jsonl, tensorboard, wandb"):
        load_config([], ["train.loggers=[jsonl,mlflow]"])


def test_wandb_without_its_package_is_refused(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb package is not installed \(pip install -e '\.\[wandb\]'\)"):
        load_config([], ["train.loggers=[jsonl,wandb]"])
