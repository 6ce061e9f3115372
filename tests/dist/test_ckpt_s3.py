"""Checkpoints on S3 (a local moto server): DCP through fsspec, DeepSpeed through local staging.

Two ranks train 3 steps into s3://, then one rank resumes from there for 2 more (DeepSpeed then
downloads its files and converts them to the universal format); both must match a local
single-process run step for step, and export must read the EMA back from S3.
"""
from __future__ import annotations

import json

import pytest
import s3fs

from ict_scale.checkpoint.load import load_ema_model
from workers.harness import checkpoint, max_abs_diff, metrics, started, train_many

pytestmark = [pytest.mark.dist, pytest.mark.s3]

RUN = ["train.total_steps=5", "train.ckpt_every=3", "train.ema_decay=0.9", "optim.eps=1e-4"]
BACKENDS = {"ddp": ["parallel.backend=ddp"],
            "zero2": ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.yaml"]}


def options_override(opts: dict) -> str:
    endpoint = opts["client_kwargs"]["endpoint_url"]
    return (f"train.storage_options={{key: {opts['key']}, secret: {opts['secret']}, "
            f"client_kwargs: {{endpoint_url: '{endpoint}'}}}}")


@pytest.fixture(scope="module")
def s3_runs(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    store = options_override(s3_server)
    urls = {name: f"s3://ckpt/{root.name}/{name}" for name in BACKENDS}
    first = [[*b, *RUN, store, f"train.run_dir={urls[n]}", "train.max_steps_this_run=3"] for n, b in BACKENDS.items()]
    train_many(2, first, str(root / "first.json"))
    reference = str(root / "reference")
    second = [["parallel.backend=single", *RUN, f"train.run_dir={reference}"],
              *([*b, *RUN, store, f"train.run_dir={urls[n]}"] for n, b in BACKENDS.items())]
    done = train_many(1, second, str(root / "second.json"))
    return urls, reference, done.stdout


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_s3_checkpoints_resume_at_another_world_size(s3_runs, s3_server, backend):
    urls, reference, stdout = s3_runs
    url = urls[backend]
    assert started(stdout, BACKENDS[backend][0].split("=")[1], 1, 3, url)
    fs = s3fs.S3FileSystem(**s3_server)
    steps = sorted(fs.ls(url.removeprefix("s3://") + "/checkpoints"))
    assert [s.rsplit("/", 1)[1] for s in steps] == ["step_000000003", "step_000000005"]
    got, want = {}, metrics(reference)
    for line in fs.cat_file(url.removeprefix("s3://") + "/metrics.jsonl").decode().splitlines():
        rec = json.loads(line)
        got[rec["step"]] = rec
    for step in range(1, 6):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
    model, _, ckpt = load_ema_model(url, storage_options=s3_server)
    assert ckpt.endswith("step_000000005")
    ref_model, _, _ = load_ema_model(checkpoint(reference, 5))
    assert max_abs_diff(dict(model.named_parameters()), dict(ref_model.named_parameters())) < 1e-7
