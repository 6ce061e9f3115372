"""Bad input meets the user as one line `error: ...` naming the key, file or URL (exit status 2); ICT_DEBUG=1
brings the traceback back. Each kind of failure runs once through a real command in a subprocess (the s3
cases all do: they depend on the environment); the other config and data checks go through the same
boundary, `cli.run(main, argv)`, in this process, which saves a torch import (seconds) per case."""
import os
import socket
import subprocess
import sys
import time

import pytest

from ict_scale import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A network and data small enough that every check runs before anything slow happens.
TINY = ["data.resolution=8", "data.num_classes=10", "data.num_workers=0", "model.model_channels=16",
        "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[]", "train.batch_size=4",
        "train.batch_per_gpu=4", "train.total_steps=2", "train.grid_every=0", "train.log_every=1"]


def clean_env(**extra) -> dict:
    """No AWS credentials from this machine (environment, files, instance metadata), no warnings noise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    env.pop("ICT_DEBUG", None)
    env.update(extra)
    return env


def one_error_line(module: str, *args: str, cwd=REPO, **env) -> str:
    """Run `python -m module args`; it must fail with status 2 and exactly one line on stderr, returned."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=clean_env(**env),
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    assert lines[0].startswith("error: ") and len(lines[0]) < 400, lines[0]
    return lines[0]


def train_error(tmp_path, *overrides: str, **env) -> str:
    return one_error_line("ict_scale.train", *TINY, f"train.run_dir={tmp_path}/run", *overrides, **env)


def in_process_error(capsys, main, *argv: str) -> str:
    """`cli.run(main, argv)` in this process: status 2 and exactly one line on stderr, returned."""
    capsys.readouterr()
    assert cli.run(main, list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 400, lines
    return lines[0]


def train_error_here(capsys, tmp_path, *overrides: str) -> str:
    from ict_scale.train.__main__ import main
    return in_process_error(capsys, main, *TINY, f"train.run_dir={tmp_path}/run", *overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards of 16 synthetic 8x8 samples with their manifest."""
    from data_prep import make_shards
    out = str(tmp_path_factory.mktemp("shards"))
    assert make_shards.main(["--dataset", "synthetic", "--num", "64", "--resolution", "8", "--shard-size", "16",
                             "--workers", "0", "--quiet", "--out", out]) == 0
    return out


def test_missing_manifest_and_shard_folder(tmp_path, capsys):
    line = train_error(tmp_path, f"data.source={tmp_path}/absent/manifest.json")
    assert f"{tmp_path}/absent/manifest.json: cannot read" in line and "No such file" in line
    line = train_error_here(capsys, tmp_path, f"data.source={tmp_path}/absent")
    assert f"{tmp_path}/absent: not found" in line


def test_shard_missing_when_a_loader_worker_reads_it(tmp_path, shards, capsys):
    import shutil
    copy = shutil.copytree(shards, str(tmp_path / "shards"))
    os.remove(os.path.join(copy, "train-000001.tar"))
    # No start-up listing: the error is raised in a DataLoader worker and re-raised by torch in this process,
    # with the worker's traceback inside its message.
    line = train_error_here(capsys, tmp_path, f"data.source={copy}", "data.check_shards=false",
                            "data.num_workers=1", "data.io_retries=1", "train.batch_size=64", "train.batch_per_gpu=64")
    assert line.startswith(f"error: {copy}/train-000001.tar: cannot read (FileNotFoundError: "), line


def test_truncated_shard_is_named(tmp_path, shards, capsys):
    import shutil
    copy = shutil.copytree(shards, str(tmp_path / "shards"))
    os.truncate(os.path.join(copy, "train-000002.tar"), 5000)
    line = train_error_here(capsys, tmp_path, f"data.source={copy}")
    assert f"{copy}/train-000002.tar: 5000 bytes, manifest says" in line


def test_s3_without_credentials_names_the_url(tmp_path):
    line = train_error(tmp_path, "data.source=s3://bucket/cifar10/manifest.json")
    assert line.startswith("error: s3://bucket/cifar10/manifest.json: ") and "no credentials" in line
    assert "AWS_ACCESS_KEY_ID" in line
    line = train_error(tmp_path, "train.run_dir=s3://bucket/runs/one")  # synthetic data: the run dir fails
    assert line.startswith("error: train.run_dir=s3://bucket/runs/one: no credentials")
    line = one_error_line("ict_scale.sample", "s3://bucket/runs/one", "--out", str(tmp_path / "x"))
    assert line.startswith("error: s3://bucket/runs/one: no credentials")


def test_unreachable_endpoint_fails_fast(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    env = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint)
    start = time.monotonic()
    line = train_error(tmp_path, "data.source=s3://bucket/data/manifest.json", **env)
    # 3-6 s: start-up, then botocore's bounded retries (2-3 s); minutes without the bound.
    assert time.monotonic() - start < 45
    assert "s3://bucket/data/manifest.json" in line and "endpoint unreachable" in line and endpoint in line
    line = train_error(tmp_path, "train.run_dir=s3://bucket/runs/one", **env)
    assert line.startswith("error: train.run_dir=s3://bucket/runs/one: endpoint unreachable")


def test_malformed_storage_options(tmp_path, capsys):
    line = train_error_here(capsys, tmp_path, "data.storage_options=5")
    assert "'data.storage_options' must be a mapping, e.g. data.storage_options='{client_kwargs:" in line
    line = train_error_here(capsys, tmp_path, "data.storage_options={client_kwargs: [1")  # bad YAML: a string
    assert "'data.storage_options' must be a mapping" in line
    env = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    line = train_error(tmp_path, "data.source=s3://bucket/data/manifest.json",
                       "data.storage_options={client_kwargs: {endpint_url: x}}", **env)
    assert "s3://bucket/data/manifest.json: cannot read (data.storage_options rejected" in line
    assert "endpint_url" in line
    line = train_error_here(capsys, tmp_path, "train.storage_options=5")
    assert "'train.storage_options' must be a mapping, e.g. train.storage_options='{client_kwargs:" in line
    # The run dir's own options are named when they are the ones refused.
    line = train_error(tmp_path, "train.run_dir=s3://bucket/runs/one", "data.storage_options={anon: false}",
                       "train.storage_options={client_kwargs: {endpint_url: x}}", **env)
    assert line.startswith("error: train.run_dir=s3://bucket/runs/one: train.storage_options rejected")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  total_steps: 3\n bad: [\n")
    line = one_error_line("ict_scale.train", str(path))
    assert line == f"error: {path}, line 3, column 2: YAML syntax error: did not find expected key"


def test_unknown_network_lists_the_valid_ones(tmp_path, capsys):
    line = train_error_here(capsys, tmp_path, "model.name=unet")
    assert line == "error: 'model.name' must be one of adm, adm_deep, ncsnpp, ncsnpp_deep; got 'unet'"


def test_batch_that_does_not_divide_suggests_sizes(tmp_path, capsys):
    line = train_error_here(capsys, tmp_path, "train.batch_size=10", "train.batch_per_gpu=4")
    assert line == ("error: train.batch_size=10 is not a multiple of train.batch_per_gpu=4 x 1 processes = 4; "
                    "use train.batch_size=8 or 12, or train.batch_per_gpu=2")


def test_attention_heads_checked_in_dry_run(tmp_path, capsys):
    line = train_error_here(capsys, tmp_path, "model.name=adm", "model.model_channels=24", "--dry-run")
    assert ("model.model_channels * model.channel_mult[1] = 48 channels, not a multiple of "
            "model.head_channels=64") in line
    line = train_error_here(capsys, tmp_path, "model.head_channels=8", "--dry-run")
    assert line.startswith("error: model.head_channels=8 does not apply to model.name=ncsnpp")


def test_head_check_passes_the_recipes_and_head_channels_reaches_the_network():
    import torch
    from ict_scale.config import load_config
    from ict_scale.networks.layers import SelfAttention
    from ict_scale.train.model import build_model
    for recipe in ("cifar10", "imagenet64"):
        load_config([os.path.join(REPO, "configs", f"{recipe}.yaml")])
    cfg = load_config([], ["model.name=adm", "model.model_channels=24", "model.channel_mult=[1,2]",
                           "model.attn_resolutions=[8]", "model.head_channels=12", "data.resolution=8"])
    with torch.device("meta"):
        heads = {m.num_heads for m in build_model(cfg).modules() if isinstance(m, SelfAttention)}
    assert heads == {2, 4}  # 24 and 48 channels in heads of 12


def test_empty_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    line = one_error_line("data_prep.make_shards", "--dataset", "folder", "--src", str(tmp_path / "images"),
                          "--resolution", "8", "--out", str(tmp_path / "out"), "--workers", "0", "--quiet")
    assert line.startswith(f"error: {tmp_path}/images: no image files (.jpg")


def test_no_checkpoint_for_sample_export_evaluate(tmp_path, capsys):
    from ict_scale import evaluate, export
    expected = f"error: no complete checkpoint under {tmp_path}/run/checkpoints (expected step_*/COMMIT)"
    assert one_error_line("ict_scale.sample", str(tmp_path / "run"), "--out", str(tmp_path / "x")) == expected
    for main in (export.main, evaluate.main):
        assert in_process_error(capsys, main, str(tmp_path / "run"), "--out", str(tmp_path / "x")) == expected


def test_ict_debug_shows_the_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ict_scale.train", "model.name=unet", "--dry-run"], cwd=REPO,
                          env=clean_env(ICT_DEBUG="1"), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("'model.name' must be one of adm, adm_deep, ncsnpp, "
                                                         "ncsnpp_deep; got 'unet'")
