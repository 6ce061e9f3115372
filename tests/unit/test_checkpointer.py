"""The Checkpointer: checkpoints of the layout written so far still resume (and sample/export read them), a
new piece of run state is one registration, and the run dir's storage options have their own key."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ict_scale.checkpoint.layout import TRAINER_STATE, TrainerState
from ict_scale.checkpoint.load import load_ema_model
from ict_scale.config import load_config
from ict_scale.train.__main__ import find_config
from ict_scale.train.loop import train
from ict_scale.train.run import run_dir_options

from test_train import TINY

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "legacy_run")
EXPECTED = json.load(open(os.path.join(FIXTURE, "expected.json")))
LEGACY_CKPT = "checkpoints/step_000000002"


def abs_sum(model) -> float:
    return sum(float(t.double().abs().sum()) for t in model.state_dict().values())


def legacy_copy(tmp_path):
    run_dir = tmp_path / "legacy"
    shutil.copytree(FIXTURE, run_dir, ignore=shutil.ignore_patterns("expected.json"))
    return run_dir


def legacy_cfg(run_dir, *extra):
    args = [a for a in EXPECTED["args"].split() if not a.startswith("train.max_steps_this_run")]
    # Written by `python -m ict_scale.train` with these overrides: the demo recipe below them.
    return load_config([find_config("demo")], [*args, f"train.run_dir={run_dir}", *extra])


# -- checkpoints written before the change ----------------------------------------------------------------
def test_the_committed_checkpoint_is_in_the_old_layout():
    state = torch.load(os.path.join(FIXTURE, LEGACY_CKPT, TRAINER_STATE), weights_only=True)
    assert "format" not in state and state["step"] == 2 and "fingerprint" in state["loader"]
    upgraded = TrainerState.from_bytes(open(os.path.join(FIXTURE, LEGACY_CKPT, TRAINER_STATE), "rb").read())
    assert upgraded.pieces["progress"] == {"step": 2, "images_seen": 8, "nonfinite_total": 0, "nonfinite_run": 0}
    assert upgraded.data_fingerprint == state["loader"]["fingerprint"]


def test_an_old_layout_checkpoint_resumes_where_it_left_off(tmp_path, capsys):
    run_dir = legacy_copy(tmp_path)
    run = train(legacy_cfg(run_dir))
    assert run.step == 4 and "resuming at step 2" in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = {str(r["step"]): r["loss"] for r in records if r["step"] > 2}
    assert resumed == pytest.approx(EXPECTED["resumed_losses"], rel=1e-6)  # same data, curriculum, weights
    model, _, ckpt = load_ema_model(str(run_dir))
    assert ckpt.endswith("step_000000004") and abs_sum(model) == pytest.approx(EXPECTED["ema_abs_sum_step_4"], rel=1e-9)
    new = torch.load(run_dir / "checkpoints/step_000000004" / TRAINER_STATE, weights_only=True)
    assert new["format"] == 2 and new["pieces"]["progress"]["step"] == 4  # written in today's layout


def test_sample_and_export_read_an_old_layout_checkpoint(tmp_path):
    from ict_scale import export, sample
    model, _, ckpt = load_ema_model(FIXTURE)
    assert ckpt.endswith(LEGACY_CKPT) and abs_sum(model) == pytest.approx(EXPECTED["ema_abs_sum_step_2"], rel=1e-9)
    assert export.main([FIXTURE, "--out", str(tmp_path / "m.safetensors")]) == 0
    tensors = load_file(str(tmp_path / "m.safetensors"))
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    assert sample.main([FIXTURE, "--steps", "1", "--num", "3", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- one registration -------------------------------------------------------------------------------------
class Toy:
    """A piece of run state the trainer knows nothing about: a record of the steps at which it was saved,
    and a tensor that follows the step (registered as a sharded piece, saved with the model's bytes)."""

    def __init__(self, run):
        self.progress, self.saved_at, self.loaded = run.progress, [], None
        self.tensors = {"w": torch.zeros(3)}

    def state_dict(self):
        self.saved_at.append(self.progress.step)
        return {"saved_at": list(self.saved_at)}

    def load_state_dict(self, state):
        self.saved_at, self.loaded = list(state["saved_at"]), state


class ToyTensors:
    def __init__(self, run):
        self.progress, self.t = run.progress, torch.zeros(3)

    def state_dict(self):
        self.t.fill_(float(self.progress.step))  # the live tensor: a save writes it, a load fills it
        return {"t": self.t}

    def load_state_dict(self, state):
        assert state["t"] is self.t


def test_a_new_piece_of_run_state_is_one_registration(tmp_path):
    made = []

    def register(ckpt, run):
        made.append((Toy(run), ToyTensors(run)))
        ckpt.register("toy", made[-1][0])
        ckpt.register("toy_tensors", made[-1][1], sharded=True)

    cfg = [*TINY, f"train.run_dir={tmp_path / 'run'}", "train.total_steps=4", "train.ckpt_every=1"]
    train(load_config([], [*cfg, "train.max_steps_this_run=2"]), register=register)
    assert made[0][0].saved_at == [1, 2] and made[0][0].loaded is None
    run = train(load_config([], cfg), register=register)
    toy, toy_tensors = made[1]
    assert toy.loaded == {"saved_at": [1, 2]}  # restored before the first step of the second process
    assert toy.saved_at == [1, 2, 3, 4] and run.step == 4
    assert torch.equal(toy_tensors.t, torch.full((3,), 4.0))
    run = train(load_config([], cfg), register=register)  # finished: restored from step 4, nothing trained
    assert made[2][0].loaded == {"saved_at": [1, 2, 3, 4]} and torch.equal(made[2][1].t, torch.full((3,), 4.0))


def test_a_piece_the_checkpoint_lacks_starts_afresh_with_a_note(tmp_path, capsys):
    run_dir = legacy_copy(tmp_path)
    toys = []

    def register(ckpt, run):
        toys.append(Toy(run))
        ckpt.register("toy", toys[-1])

    train(legacy_cfg(run_dir, "train.max_steps_this_run=1"), register=register)
    assert toys[0].loaded is None and toys[0].saved_at == [3]
    assert f"{run_dir}/{LEGACY_CKPT} holds no state for 'toy'" in capsys.readouterr().out


# -- the run dir's storage options ------------------------------------------------------------------------
def test_the_run_dir_has_its_own_storage_options_and_the_data_key_still_works_with_a_note(tmp_path):
    data = "data.storage_options={anon: true}"
    own, note = run_dir_options(load_config([], [data, "train.storage_options={key: k}"]))
    assert own == {"key": "k"} and note is None
    old, note = run_dir_options(load_config([], [data]))
    assert old == {"anon": True} and "deprecated" in note and "train.storage_options" in note
    assert run_dir_options(load_config([], [])) == ({}, None)


def test_a_name_is_registered_once(tmp_path):
    from ict_scale.checkpoint import Storage
    from ict_scale.checkpoint.checkpointer import Checkpointer
    ckpt = Checkpointer(Storage(str(tmp_path)), model=None, rank=0, world_size=1, config_yaml="")
    toy = ToyTensors(type("R", (), {"progress": None})())
    ckpt.register("toy", toy, sharded=True)
    for name in ("toy", "a/b"):
        with pytest.raises(ValueError, match="cannot register run state"):
            ckpt.register(name, toy)
