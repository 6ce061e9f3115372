"""The whole stage on one process: reference statistics from data, then generation + features + FID + records."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from data_prep import ref_stats
from ict_scale.data.synthetic import synthetic_images
from ict_scale.eval import (EvalConfig, FeatureMoments, FIDEvaluator, RefStats, SampleSpec, build_inception,
                            load_ref_stats, sample_inputs)
from ict_scale.ict import ConsistencyModel, generate_uint8, sampling_sigmas
from ict_scale.networks import build_network, network_c_noise

RES = 16


@pytest.fixture(scope="module")
def features():
    return build_inception(random_seed=0)  # seeded random weights: enough to compare pipelines


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_network("ncsnpp", model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                        img_resolution=RES, dropout=0.3)
    with torch.no_grad():  # the recipe's zero-initialised output layers would make every sample the same
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ConsistencyModel(net, network_c_noise("ncsnpp"))


@pytest.fixture(scope="module")
def ref_file(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "synthetic16.npz")
    ref_stats.main(["--data", "synthetic", "--out", out, "--num", "4", "--resolution", str(RES), "--batch-per-rank",
                    "3", "--workers", "0", "--random-inception", "0", "--keep-features"])
    return out


def manual_moments(feature_fn, batches):
    m = FeatureMoments()
    for images in batches:
        m.add(feature_fn(images))
    return m.mean_cov()


def test_ref_stats_cover_exactly_the_first_num_images(ref_file, features):
    ref = load_ref_stats(ref_file, with_features=True)
    images, _ = synthetic_images(torch.arange(4), seed=0, resolution=RES)
    mu, sigma = manual_moments(features, [images[:3], images[3:]])  # the command's batches of 3, the 2nd trimmed
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-12, atol=1e-15)
    assert ref.features.shape == (4, 2048)
    assert ref.meta["count"] == 4 and ref.meta["resolution"] == RES and ref.meta["source"]["data"] == "synthetic"
    assert ref.meta["protocol"]["weights_sha256"] == features.protocol["weights_sha256"]


def test_ref_stats_from_shards_equal_those_of_the_same_images(ref_file, tmp_path):
    from data_prep import make_shards
    shards = str(tmp_path / "shards")
    make_shards.main(["--dataset", "synthetic", "--num", "4", "--resolution", str(RES), "--shard-size", "3",
                      "--workers", "0", "--out", shards, "--quiet"])  # the same 4 images, shuffled into 2 shards
    out = str(tmp_path / "from_shards.npz")
    ref_stats.main(["--data", shards, "--out", out, "--resolution", str(RES), "--batch-per-rank", "3",
                    "--workers", "0", "--random-inception", "0"])  # --num defaults to the whole data set
    ours, direct = load_ref_stats(out), load_ref_stats(ref_file)
    assert ours.meta["count"] == 4 and ours.meta["source"]["data"] == shards
    np.testing.assert_allclose(ours.mu, direct.mu, rtol=1e-12, atol=1e-15)  # a different order: round-off only
    np.testing.assert_allclose(ours.sigma, direct.sigma, rtol=1e-10, atol=1e-15)


def test_stage_equals_a_manual_computation_and_records(ref_file, features, model, tmp_path):
    cfg = EvalConfig(num=4, steps=[1, 2], batch_per_rank=2, ref=ref_file, precision_recall=True, seed=3)
    spec = SampleSpec((3, RES, RES), num_classes=0, sigma_mid=0.821)
    evaluator = FIDEvaluator(cfg, "cpu", features=features)
    model.train()  # the stage must sample in eval mode (dropout off) and give the mode back
    result = evaluator.run(model, spec, step=7, run_dir=str(tmp_path / "run"), checkpoint="checkpoints/step_000000007")
    assert model.training

    model.eval()
    for k in (1, 2):
        batches = []
        for idx in (range(0, 2), range(2, 4)):
            z, renoise, _ = sample_inputs(idx, spec.shape, 3, 0, 1)
            batches.append(generate_uint8(model, z, renoise, None, sampling_sigmas(k, 80.0, 0.821), 0.002))
        # Same batches, same features, same float64 sums: the stage adds nothing and loses nothing.
        assert result[f"fid_{k}step"] == pytest.approx(evaluator.distance(*manual_moments(features, batches)),
                                                       rel=1e-12)
        assert 0.0 <= result[f"precision_{k}step"] <= 1.0 and 0.0 <= result[f"recall_{k}step"] <= 1.0
    assert result["fid_1step"] != result["fid_2step"]
    assert result["num"] == 4 and result["world_size"] == 1 and result["timing_only"] is True

    run = tmp_path / "run"
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 7 and line["fid_1step"] == result["fid_1step"] and line["num"] == 4
    assert json.loads((run / "best.json").read_text())["checkpoint"] == "checkpoints/step_000000007"
    assert json.loads((run / "fid.json").read_text())["fid_2step"] == result["fid_2step"]


def test_reference_from_other_weights_or_resolution_is_refused(ref_file, features):
    ref = load_ref_stats(ref_file)
    other = dataclasses.replace(ref, meta={**ref.meta, "protocol": {"weights_sha256": "0" * 64}})
    with pytest.raises(ValueError, match="different|other|same weights"):
        FIDEvaluator(EvalConfig(ref=ref_file), "cpu", features=features, ref=other)
    evaluator = FIDEvaluator(EvalConfig(ref=ref_file, num=2), "cpu", features=features, ref=ref)
    with pytest.raises(ValueError, match="16x16"):
        evaluator.score(lambda x, s, c: x, SampleSpec((3, 32, 32), 0, 0.821))


def test_precision_recall_needs_reference_features(ref_file, features):
    ref = load_ref_stats(ref_file)  # read without features
    with pytest.raises(ValueError, match="--keep-features"):
        FIDEvaluator(EvalConfig(ref=ref_file, precision_recall=True), "cpu", features=features,
                     ref=RefStats(ref.mu, ref.sigma, ref.layout, ref.source, ref.meta))
