"""`sample` and `evaluate` read an exported NAME.safetensors (+ NAME.yaml) as they read a run directory."""
import json

import numpy as np
import pytest

from ict_scale.errors import UserError
import torch

from data_prep import ref_stats
from ict_scale import evaluate, export, sample
from ict_scale.config import load_config
from ict_scale.eval import ClassifierSpec, SmallClassifier, save_classifier
from ict_scale.train.loop import train

TINY = ["model.name=ncsnpp", "model.model_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1",
        "model.attn_resolutions=[]", "model.dropout=0", "data.source=synthetic", "data.resolution=8",
        "data.num_classes=4", "data.num_workers=0", "data.drop_labels=false", "train.batch_size=4",
        "train.batch_per_gpu=4", "train.total_steps=2", "train.grid_every=0", "train.grid_num=4", "ict.s1=40"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exported")
    train(load_config([], TINY + [f"train.run_dir={tmp / 'run'}"]))
    assert export.main([str(tmp / "run"), "--out", str(tmp / "out" / "model.safetensors")]) == 0
    return tmp


def test_sample_reads_an_export_as_it_reads_the_run(exported):
    for name, path in (("run", exported / "run"), ("export", exported / "out" / "model.safetensors")):
        assert sample.main([str(path), "--steps", "2", "--num", "4", "--out", str(exported / name)]) == 0
    run, exp = (np.load(exported / f"{n}.npz")["arr_0"] for n in ("run", "export"))
    assert run.shape == (4, 8, 8, 3) and np.array_equal(run, exp)


def test_evaluate_reads_an_export_and_writes_beside_it(exported, capsys):
    # FCD on a small random classifier: the same command as FID, without Inception's minute on 2 cores.
    torch.manual_seed(0)
    weights, ref = str(exported / "clf.safetensors"), str(exported / "fcd8.npz")
    save_classifier(weights, SmallClassifier(ClassifierSpec(4, 8, widths=(8, 16), strides=(1, 2), feature_dim=24,
                                                            groups=4)))
    ref_stats.main(["--data", "synthetic", "--out", ref, "--num", "16", "--resolution", "8", "--num-classes", "4",
                    "--batch-per-rank", "16", "--workers", "0", "--features", "classifier",
                    "--classifier-weights", weights])
    capsys.readouterr()
    assert evaluate.main([str(exported / "out" / "model.safetensors"), "--ref", ref, "--num", "4", "--steps", "1",
                          "--batch-per-rank", "4", "--features", "classifier", "--classifier-weights", weights]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num"] == 4 and printed["fcd_1step"] > 0
    best = json.loads((exported / "out" / "best.json").read_text())
    assert best["checkpoint"] == "model.safetensors" and best["value"] == printed["fcd_1step"]


def test_an_export_without_its_config_is_one_clear_error(exported):
    lone = exported / "lone.safetensors"
    lone.write_bytes((exported / "out" / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"lone\.safetensors: its config .*lone\.yaml is missing"):
        sample.main([str(lone), "--out", str(exported / "x")])
    with pytest.raises(UserError, match=r"missing\.safetensors: no such file"):
        evaluate.main([str(exported / "missing.safetensors"), "--ref", "r.npz"])
