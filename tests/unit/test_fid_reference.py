"""Reference statistics files: our layout, EDM's (mu, sigma) and ADM's reference batch (arr_0, mu, sigma, ...)."""
import json

import numpy as np
import pytest

from ict_scale.eval import load_ref_stats, save_ref_stats


def stats(dim=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((50, dim))
    return x.mean(0), np.cov(x, rowvar=False)


def test_edm_layout(tmp_path):
    mu, sigma = stats()
    path = tmp_path / "cifar10-32x32.npz"
    np.savez(path, mu=mu, sigma=sigma)
    ref = load_ref_stats(str(path))
    assert ref.layout == "edm" and ref.meta == {} and ref.features is None
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)


def test_adm_reference_batch_layout_ignores_images(tmp_path):
    mu, sigma = stats(seed=1)
    path = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    images = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32),
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    ref = load_ref_stats(str(path), with_features=True)
    assert ref.layout == "adm" and ref.features is None
    assert ref.mu.dtype == np.float64 and ref.sigma.dtype == np.float64  # promoted for the float64 distance
    np.testing.assert_allclose(ref.sigma, sigma.astype(np.float32), rtol=0)


def test_our_layout_round_trips_meta_and_features(tmp_path):
    mu, sigma = stats(seed=2)
    feats = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    meta = {"protocol": {"weights_sha256": "ab" * 32}, "count": 50, "source": {"data": "synthetic"}}
    path = str(tmp_path / "sub" / "ref.npz")  # the parent directory is created
    save_ref_stats(path, mu, sigma, meta, feats)
    ref = load_ref_stats(path, with_features=True)
    assert ref.layout == "ict_scale" and ref.meta == meta and ref.source == path
    np.testing.assert_array_equal(ref.features, feats)
    assert load_ref_stats(path).features is None  # features are only read when asked for
    assert not list((tmp_path / "sub").glob("*.tmp*"))  # the atomic write left no temporary file


def test_missing_keys_name_the_file_and_what_was_found(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, mean=np.zeros(3), cov=np.eye(3))
    with pytest.raises(ValueError) as err:
        load_ref_stats(str(path))
    assert str(path) in str(err.value) and "['mu', 'sigma']" in str(err.value) and "'cov'" in str(err.value)


@pytest.mark.parametrize("mu, sigma, match", [
    (np.zeros(3), np.eye(4), "expected mu"),
    (np.zeros(3), np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]), "not symmetric"),
    (np.array([0.0, np.nan, 0.0]), np.eye(3), "'mu' has non-finite"),
])
def test_bad_contents_are_refused(tmp_path, mu, sigma, match):
    path = tmp_path / "bad.npz"
    np.savez(path, mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match=match):
        load_ref_stats(str(path))


def test_not_an_npz_and_missing_file(tmp_path):
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_ref_stats(str(single))
    text = tmp_path / "text.npz"
    text.write_text(json.dumps({"mu": [0]}))
    with pytest.raises(ValueError, match="not an .npz"):
        load_ref_stats(str(text))
    with pytest.raises(FileNotFoundError, match="data_prep.ref_stats"):
        load_ref_stats(str(tmp_path / "absent.npz"))
