"""The FCD feature network: weights file checks, feature sizes through statistics and references, refusals of
mixed extractors, the evaluator and the command lines with eval.features=classifier."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from data_prep import make_shards, ref_stats, train_classifier
from ict_scale import evaluate
from ict_scale.data.synthetic import synthetic_images
from ict_scale.eval import (ClassifierSpec, ClassifierWeightsError, EvalConfig, FeatureMoments, FIDEvaluator, RefStats,
                            SampleSpec, SmallClassifier, build_classifier_features, build_features, build_inception,
                            check_compatible, check_eval_config, frechet_distance, load_ref_stats, save_classifier)
from ict_scale.eval.classifier import FORMAT
from ict_scale.ict import ConsistencyModel
from ict_scale.networks import build_network, network_c_noise

RES, CLASSES = 16, 4
SPEC = ClassifierSpec(CLASSES, RES, widths=(8, 16), strides=(1, 2), feature_dim=24, groups=4)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("clf") / "clf.safetensors")
    sha = save_classifier(path, SmallClassifier(SPEC), {"held_out_accuracy": 0.5})
    return path, sha


@pytest.fixture(scope="module")
def features(weights):
    return build_classifier_features(weights[0])


@pytest.fixture(scope="module")
def ref_file(weights, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "fcd16.npz")
    ref_stats.main(["--data", "synthetic", "--out", out, "--num", "40", "--resolution", str(RES), "--num-classes",
                    str(CLASSES), "--batch-per-rank", "16", "--workers", "0", "--features", "classifier",
                    "--classifier-weights", weights[0], "--keep-features"])
    return out


def images(n=12, start=0):
    return synthetic_images(torch.arange(start, start + n), 0, RES, CLASSES)[0]


def test_features_interface_and_protocol(features, weights):
    f = features(images())
    assert f.dtype == torch.float32 and f.shape == (12, 24) and features.dim == 24
    p = features.protocol
    assert (p["extractor"], p["metric"], p["feature_dim"], p["weights_sha256"]) == ("classifier", "fcd", 24, weights[1])
    assert p["resolution"] == RES and p["held_out_accuracy"] == 0.5
    # GroupNorm: a sample's features do not depend on the rest of its batch.
    torch.testing.assert_close(torch.cat([features(images()[:5]), features(images()[5:])]), f, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        features(images().float())
    with pytest.raises(ValueError, match="16x16"):
        features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_weights_round_trip_exactly(weights):
    torch.manual_seed(0)
    original = SmallClassifier(SPEC)
    loaded = build_classifier_features(weights[0], sha256=weights[1]).network
    for (k, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_weight_files_are_refused(weights, tmp_path):
    with pytest.raises(ClassifierWeightsError, match="expected " + "0" * 64):
        build_classifier_features(weights[0], sha256="0" * 64)
    with pytest.raises(ClassifierWeightsError, match="not found.*train_classifier"):
        build_classifier_features(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ClassifierWeightsError, match="needs eval.classifier_weights"):
        build_classifier_features("")
    torch_file = tmp_path / "state.pt"
    torch.save(SmallClassifier(SPEC).state_dict(), torch_file)
    with pytest.raises(ClassifierWeightsError, match="not a safetensors file"):
        build_classifier_features(str(torch_file))
    state = {k: v.contiguous() for k, v in SmallClassifier(SPEC).state_dict().items()}
    ours = {"format": FORMAT, "spec": json.dumps(dataclasses.asdict(SPEC))}
    cases = {
        "other.safetensors": (state, {"format": "somebody/else"}, "format is 'somebody/else'"),
        "shape.safetensors": ({**state, "head.weight": torch.zeros(CLASSES + 1, 24)}, ours,
                              r"'head.weight' has shape \(5, 24\).*\(4, 24\)"),
        "keys.safetensors": ({k: v for k, v in state.items() if k != "head.bias"}, ours, r"missing \['head.bias'\]"),
        "spec.safetensors": (state, {"format": FORMAT, "spec": "{\"depth\": 3}"}, "not a classifier architecture"),
    }
    for name, (tensors, meta, match) in cases.items():
        (tmp_path / name).write_bytes(save_safetensors(tensors, metadata=meta))
        with pytest.raises(ClassifierWeightsError, match=match):
            build_classifier_features(str(tmp_path / name))


def test_reference_holds_classifier_statistics_of_the_first_images(ref_file, features):
    ref = load_ref_stats(ref_file, with_features=True)
    m = FeatureMoments(features.dim)
    for part in images(40).split(16):
        m.add(features(part))
    mu, sigma = m.mean_cov()
    assert ref.mu.shape == (24,) and ref.sigma.shape == (24, 24) and ref.features.shape == (40, 24)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-10, atol=1e-15)
    assert ref.meta["protocol"]["extractor"] == "classifier" and ref.meta["protocol"]["feature_dim"] == 24
    # A set against its own statistics: zero up to round-off.
    assert abs(frechet_distance(mu, sigma, ref.mu, ref.sigma).fid) < 1e-9 * np.trace(sigma)
    assert frechet_distance(mu, sigma, *moments(features, images(40, start=1000))).fid > 1e-6


def saved(path: str, spec: ClassifierSpec, seed: int = 0) -> str:
    torch.manual_seed(seed)
    save_classifier(path, SmallClassifier(spec))
    return path


def moments(features, x):
    m = FeatureMoments(features.dim)
    m.add(features(x))
    return m.mean_cov()


def test_mixing_extractors_or_weights_is_refused(ref_file, features, weights, tmp_path):
    ref = load_ref_stats(ref_file)
    inception_ref = RefStats(np.zeros(2048), np.eye(2048), "edm", "edm.npz")  # EDM's layout: Inception's
    with pytest.raises(ValueError, match="edm.npz holds inception features, this evaluation uses classifier"):
        check_compatible(inception_ref, features.protocol)
    with pytest.raises(ValueError, match="holds classifier features, this evaluation uses inception"):
        check_compatible(ref, build_inception(random_seed=0).protocol)
    other = build_classifier_features(saved(str(tmp_path / "o.safetensors"), SPEC, seed=1))
    with pytest.raises(ValueError, match="classifier weights sha256 .*recompute the reference"):
        check_compatible(ref, other.protocol)
    wider = build_classifier_features(saved(str(tmp_path / "w.safetensors"), dataclasses.replace(SPEC, feature_dim=32)))
    with pytest.raises(ValueError, match="24-d statistics, the classifier features are 32-d"):
        check_compatible(ref, wider.protocol)
    with pytest.raises(ValueError, match="takes 16x16 images, the model makes 32x32"):
        check_compatible(dataclasses.replace(ref, meta={"protocol": ref.meta["protocol"]}), features.protocol,
                         SampleSpec((3, 32, 32), 0, 0.821))


def test_eval_config_names_the_extractor():
    with pytest.raises(ValueError, match="eval.features='clip'"):
        check_eval_config(EvalConfig(features="clip"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_network("ncsnpp", model_channels=16, channel_mult=(1,), num_blocks=1, attn_resolutions=(),
                        img_resolution=RES, dropout=0.0)
    with torch.no_grad():  # the recipe's zero-initialised output layers would make every sample the same
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ConsistencyModel(net, network_c_noise("ncsnpp"))


def test_evaluator_scores_fcd_and_records_it(ref_file, weights, model, tmp_path):
    cfg = EvalConfig(num=6, steps=[1, 2], batch_per_rank=4, ref=ref_file, precision_recall=True,
                     features="classifier", classifier_weights=weights[0])
    evaluator = FIDEvaluator(cfg, "cpu")  # the trainer's call: the extractor comes from the config alone
    run = tmp_path / "run"
    result = evaluator.run(model, SampleSpec((3, RES, RES), 0, 0.821), step=5, run_dir=str(run),
                           checkpoint="checkpoints/step_000000005")
    assert result["fcd_1step"] > 0 and result["fcd_2step"] > 0 and not any(k.startswith("fid_") for k in result)
    assert result["protocol"]["extractor"] == "classifier" and result["timing_only"] is False
    assert 0 <= result["precision_1step"] <= 1
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["fcd_1step"] == result["fcd_1step"] and line["step"] == 5
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "fcd_1step" and best["value"] == result["fcd_1step"]
    assert json.loads((run / "fcd.json").read_text())["fcd_2step"] == result["fcd_2step"]
    assert not (run / "fid.json").exists()


def test_train_classifier_command(tmp_path, capsys):
    for split in ("train", "val"):
        make_shards.main(["--dataset", "synthetic", "--split", split, "--num", "48", "--num-classes", str(CLASSES),
                          "--resolution", str(RES), "--shard-size", "16", "--workers", "0", "--quiet",
                          "--out", str(tmp_path / split)])
    # no --resolution: the manifests' 16x16 (it used to default to 32); a disagreeing one names both values
    args = ["--data", str(tmp_path / "train"), "--val", str(tmp_path / "val" / "manifest.json"),
            "--steps", "3", "--batch", "16", "--workers", "0", "--out", str(tmp_path / "c.safetensors")]
    with pytest.raises(SystemExit, match=rf"--resolution 32, but the manifest of .*train records {RES}x{RES} images"):
        train_classifier.main(args + ["--resolution", "32"])
    with pytest.raises(SystemExit, match="held-out accuracy .* < --min-accuracy 1.01: not written"):
        train_classifier.main(args + ["--min-accuracy", "1.01"])
    assert not (tmp_path / "c.safetensors").exists()
    assert train_classifier.main(args + ["--min-accuracy", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    features = build_classifier_features(str(tmp_path / "c.safetensors"), sha256=report["sha256"])
    assert features.protocol["held_out_accuracy"] == report["held_out_accuracy"] and report["held_out_images"] == 48
    assert features.protocol["num_classes"] == CLASSES and features(images(2)).shape == (2, 256)
    assert features.protocol["resolution"] == RES


def test_ref_stats_of_shards_take_the_resolution_from_the_manifest(tmp_path, weights):
    shards = str(tmp_path / "shards")
    make_shards.main(["--dataset", "synthetic", "--num", "8", "--num-classes", str(CLASSES), "--resolution",
                      str(RES), "--workers", "0", "--quiet", "--out", shards])
    args = ["--data", shards, "--out", str(tmp_path / "r.npz"), "--num", "8", "--workers", "0", "--features",
            "classifier", "--classifier-weights", weights[0], "--batch-per-rank", "8"]
    with pytest.raises(SystemExit, match=rf"--resolution 32, but the manifest of .*shards records {RES}x{RES}"):
        ref_stats.main(args + ["--resolution", "32"])
    assert ref_stats.main(args) == 0  # it used to default to 32, which these shards do not hold
    assert load_ref_stats(str(tmp_path / "r.npz")).meta["source"]["resolution"] == RES


def test_synthetic_val_split_is_disjoint_from_train():
    from data_prep.datasets import SYNTHETIC_SPLIT_FIRST, synthetic
    train, val = synthetic(8, CLASSES, RES, 0), synthetic(8, CLASSES, RES, 0, split="val")
    assert train.description == "synthetic(seed=0)"  # unchanged: earlier train manifests still resume
    first = list(val.payload(np.arange(2)).render())[0][0]
    expected = synthetic_images(torch.tensor([SYNTHETIC_SPLIT_FIRST["val"]]), 0, RES, CLASSES)[0][0]
    np.testing.assert_array_equal(first, expected.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="--split must be one of"):
        synthetic(8, CLASSES, RES, 0, split="test")


def test_command_lines_take_the_classifier():
    args = evaluate.parse_args(["runs/x", "--features", "classifier", "--classifier-weights", "c.safetensors"])
    cfg = evaluate.eval_config(EvalConfig(), args)
    assert (cfg.features, cfg.classifier_weights) == ("classifier", "c.safetensors")
    assert evaluate.eval_config(EvalConfig(features="classifier"), evaluate.parse_args(["runs/x"])).features == \
        "classifier"


def test_random_inception_weights_are_refused_for_the_classifier(weights):
    path, _ = weights
    with pytest.raises(SystemExit):  # argparse's error: the two flags contradict each other
        ref_stats.parse_args(["--data", "synthetic", "--out", "r.npz", "--features", "classifier",
                              "--random-inception", "0"])
    with pytest.raises(ValueError, match="apply to eval.features=inception only"):
        build_features(EvalConfig(features="classifier", classifier_weights=path), "cpu", random_inception=0)
    args = ref_stats.parse_args(["--data", "synthetic", "--out", "r.npz", "--features", "classifier",
                                 "--classifier-weights", path])
    assert build_features(ref_stats.feature_config(args), "cpu").protocol["extractor"] == "classifier"
