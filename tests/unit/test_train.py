"""The training loop end to end on CPU: resume equality, divergence guard, run directory contents."""
import json
import math
import re

import pytest
import torch

from ict_scale.checkpoint import COMMIT, CheckpointManager, Storage
from ict_scale.config import load_config
from ict_scale.checkpoint.load import load_ema_model
from ict_scale.train.loop import train

TINY = ["model.name=ncsnpp", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1",
        "model.attn_resolutions=[4]", "model.dropout=0.2", "data.source=synthetic", "data.resolution=8",
        "data.num_classes=4", "data.num_workers=0", "data.drop_labels=true", "train.batch_size=8",
        "train.batch_per_gpu=4", "train.total_steps=8", "train.log_every=1", "train.grid_every=0",
        "train.grid_num=4", "train.ckpt_every=100", "train.keep_last=2", "ict.s1=40", "eval.sigma_mid=0.821"]


def tiny_cfg(run_dir, *extra):
    return load_config([], TINY + [f"train.run_dir={run_dir}", *extra])


def losses(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def weights(run_dir):
    model, _, _ = load_ema_model(str(run_dir))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stop_and_resume_is_bit_identical(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny_cfg(full))
    run = train(tiny_cfg(split, "train.max_steps_this_run=3"))
    assert run.step == 3
    run = train(tiny_cfg(split))  # same command again: resumes from step 3
    assert run.step == 8
    assert losses(full) == losses(split)  # bit-identical floats
    wf, ws = weights(full), weights(split)
    assert wf.keys() == ws.keys() and all(torch.equal(wf[k], ws[k]) for k in wf)
    a = (full / "checkpoints/step_000000008/__0_0.distcp").read_bytes()
    b = (split / "checkpoints/step_000000008/__0_0.distcp").read_bytes()
    assert a == b  # model, optimiser and EMA state: the same bytes


def shards_with_one_undecodable_sample(root) -> str:
    """16 unlabelled 8x8 samples in one shard, sample 5 not a PNG: skipped once per epoch (2 steps of 8)."""
    import hashlib
    import numpy as np
    from data_prep.shard_writer import encode_png, tar_bytes
    from ict_scale.data.manifest import Manifest, ShardEntry
    rng = np.random.default_rng(0)
    members = [(f"{i:03d}.png", encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))) for i in range(16)]
    members[5] = ("005.png", b"not a png")
    data = tar_bytes(members)
    root.mkdir()
    (root / "train-000000.tar").write_bytes(data)
    manifest = Manifest("test", [3, 8, 8], 0, "test", [ShardEntry("train-000000.tar", 16, len(data),
                                                                   hashlib.sha256(data).hexdigest())])
    (root / "manifest.json").write_text(manifest.to_json())
    return str(root)


def test_skip_counters_continue_across_a_resume(tmp_path):
    source = shards_with_one_undecodable_sample(tmp_path / "shards")
    data = [f"data.source={source}", "data.num_classes=0", "data.max_skip_rate=0.5", "train.total_steps=4"]
    train(tiny_cfg(tmp_path / "run", *data, "train.max_steps_this_run=2"))  # epoch 1
    train(tiny_cfg(tmp_path / "run", *data))  # resumed: epoch 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["data_skips"]["undecodable"] == 1 and records[3]["data_skips"]["undecodable"] == 2


def test_run_directory_contents(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "train.total_steps=4", "train.ckpt_every=1", "train.grid_every=2"))
    assert (run_dir / "config.yaml").read_text().count("total_steps: 4") == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("images_seen", "loss", "num_scales", "grad_norm", "lr", "img_per_s", "seconds"):
        assert key in records[0]
    assert records[-1]["images_seen"] == 4 * 8
    assert all(math.isfinite(r["loss"]) for r in records)
    for name in ("step_000000002_1step.png", "step_000000004_2step.png", "latest_1step.png"):
        assert (run_dir / "samples" / name).stat().st_size > 0
    ckpts = CheckpointManager(Storage(str(run_dir)), keep_last=2)
    assert ckpts.complete_steps() == [3, 4]  # keep-last-2 pruned steps 1 and 2


def test_plain_output_has_total_steps_and_eta_and_the_run_ends_with_a_summary(tmp_path, capsys):
    """Output redirected (not a terminal): one plain line per log step, then where everything is."""
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "train.total_steps=4", "train.log_every=2", "train.grid_every=2", "train.ckpt_every=2",
                   "train.max_steps_this_run=2"))
    out = capsys.readouterr().out
    assert re.findall(r"^step +(\d+)/4  loss .* (\d+:\d\d:\d\d)  ETA (\d+:\d\d:\d\d)$", out, re.M)[0][0] == "2"
    assert "paused at step 2 of 4 (train.max_steps_this_run=2); run the same command to continue" in out
    train(tiny_cfg(run_dir, "train.total_steps=4", "train.log_every=2", "train.grid_every=2", "train.ckpt_every=2"))
    out = capsys.readouterr().out
    assert re.search(r"^step +4/4  loss .*  ETA 0:00:00$", out, re.M), out
    assert re.search(r"^run complete: step 4 of 4\n  this run: 2 steps, 16 images in \d+:\d\d:\d\d; 32 images "
                     r"since the start; last loss \d+\.\d{5} \(step 4\)$", out, re.M), out
    for line in (f"  sample grids: {run_dir}/samples/latest_1step.png and latest_2step.png",
                 f"  metrics: {run_dir}/metrics.jsonl", f"  last checkpoint: {run_dir}/checkpoints/step_000000004"):
        assert line in out.splitlines()
    train(tiny_cfg(run_dir, "train.total_steps=4"))  # the same command once more: nothing to do, and it says so
    out = capsys.readouterr().out
    assert "has finished all 4 steps (nothing to resume)" in out
    assert f"last checkpoint {run_dir}/checkpoints/step_000000004" in out


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "train.total_steps=3", "train.ckpt_every=1", "train.max_steps_this_run=2"))
    # Simulate a save of step 5 that died mid-write: files present, no COMMIT marker.
    broken = run_dir / "checkpoints" / "step_000000005"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    (broken / "trainer_state.pt").write_bytes(b"partial")
    assert CheckpointManager(Storage(str(run_dir))).latest() == 2
    with pytest.raises(FileNotFoundError, match="is an incomplete checkpoint"):
        load_ema_model(str(broken))
    run = train(tiny_cfg(run_dir, "train.total_steps=3", "train.ckpt_every=1"))
    assert run.step == 3
    assert not broken.exists()  # removed at start-up: a partial save may hold the space the next one needs
    assert (run_dir / "checkpoints" / "step_000000003" / COMMIT).exists()


def test_divergence_guard_skips_then_stops(tmp_path):
    run_dir = tmp_path / "run"
    # A learning rate this large drives the weights to inf/nan within a few steps.
    from ict_scale.train.run import DivergenceError
    with pytest.raises(DivergenceError, match="consecutive non-finite"):
        train(tiny_cfg(run_dir, "optim.lr=1e30", "train.total_steps=50", "train.max_nonfinite_steps=3",
                       "train.ckpt_every=1"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["nonfinite_total"] >= 1
    last = CheckpointManager(Storage(str(run_dir))).latest()
    assert last is not None  # the last good checkpoint is kept
    model, _, _ = load_ema_model(str(run_dir))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fid_during_training_is_recorded_and_best_checkpoint_kept(tmp_path):
    from data_prep import ref_stats
    from ict_scale.eval.inception import random_inception_state_dict
    weights, ref = tmp_path / "inception.pth", tmp_path / "ref.npz"
    torch.save(random_inception_state_dict(0), weights)
    ref_stats.main(["--data", "synthetic", "--out", str(ref), "--num", "6", "--resolution", "8",
                    "--batch-per-rank", "6", "--workers", "0", "--inception-weights", str(weights),
                    "--inception-sha256", ""])
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "train.total_steps=4", "train.keep_last=1", "eval.every_steps=2", "eval.num=4",
                   "eval.batch_per_rank=4", "eval.steps=[1,2]", f"eval.ref={ref}", f"eval.inception_weights={weights}", "eval.inception_sha256="))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fids = [x for x in lines if "fid_1step" in x]
    assert [x["step"] for x in fids] == [2, 4]
    assert all(math.isfinite(x["fid_1step"]) and math.isfinite(x["fid_2step"]) for x in fids)
    best = json.loads((run_dir / "best.json").read_text())
    steps = CheckpointManager(Storage(str(run_dir)), keep_last=1).complete_steps()
    assert best["step"] in steps and 4 in steps  # keep-last-1 plus the best by FID
    assert best["value"] == min(x["fid_1step"] for x in fids)


def test_async_save_commits_every_checkpoint_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    run = train(tiny_cfg(run_dir, "train.total_steps=3", "train.ckpt_every=1", "train.keep_last=5",
                         "parallel.async_save=true", "train.max_steps_this_run=2"))
    assert run.step == 2 and run.ckpt.pending is None
    assert CheckpointManager(Storage(str(run_dir))).complete_steps() == [1, 2]
    run = train(tiny_cfg(run_dir, "train.total_steps=3", "train.ckpt_every=1", "train.keep_last=5",
                         "parallel.async_save=true"))
    assert run.step == 3 and CheckpointManager(Storage(str(run_dir))).complete_steps() == [1, 2, 3]


def test_resume_refuses_a_changed_recipe(tmp_path):
    from ict_scale.config import ConfigError
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "train.total_steps=2", "train.ckpt_every=1"))
    with pytest.raises(ConfigError) as e:
        train(tiny_cfg(run_dir, "train.total_steps=4", "ict.s1=80"))
    assert "train.total_steps: checkpoint 2, now 4" in str(e.value) and "ict" in str(e.value)
    run = train(tiny_cfg(run_dir, "train.total_steps=2", "train.log_every=2"))  # logging may change
    assert run.step == 2


def test_sample_and_export_command_lines(tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    from ict_scale import export, sample
    run_dir = tmp_path / "run"
    train(tiny_cfg(run_dir, "train.total_steps=2", "data.drop_labels=false"))
    out = tmp_path / "s"
    assert sample.main([str(run_dir), "--steps", "2", "--num", "5", "--out", str(out), "--class-label", "1"]) == 0
    arr = np.load(f"{out}.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8  # ADM's layout: NHWC uint8
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert export.main([str(run_dir), "--out", str(tmp_path / "m.safetensors")]) == 0
    tensors = load_file(str(tmp_path / "m.safetensors"))
    ema = weights(run_dir)
    assert tensors.keys() == ema.keys() and all(torch.equal(tensors[k], ema[k]) for k in ema)
    assert "total_steps: 2" in (tmp_path / "m.yaml").read_text()
