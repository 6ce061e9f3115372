"""Frechet distance and float64 feature moments: analytic cases and the scipy sqrtm form."""
import numpy as np
import pytest
import scipy.linalg
import torch

from ict_scale.eval import FeatureMoments, all_reduce_moments, frechet_distance
from ict_scale.eval.frechet import psd_sqrt


def ttur_frechet(mu1, s1, mu2, s2, eps=1e-6):
    """The classic form: sqrtm of the (non-symmetric) product, eps offset if singular, real part."""
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def random_spd(rng, d, n):
    a = rng.standard_normal((n, d))
    return a.T @ a / n


def test_identity_covariances_give_squared_mean_distance():
    d = np.array([1.0, -2.0, 0.5, 3.0])
    terms = frechet_distance(np.zeros(4), np.eye(4), d, np.eye(4))
    assert terms.fid == pytest.approx(float(d @ d), rel=1e-12)
    assert abs(terms.trace_term) < 1e-12


def test_scaled_identity_known_value():
    # tr(4I) + tr(I) - 2 tr(sqrt(4I)) = 4D + D - 4D = D
    dim = 7
    fid = frechet_distance(np.zeros(dim), 4 * np.eye(dim), np.zeros(dim), np.eye(dim)).fid
    assert fid == pytest.approx(dim, rel=1e-12)


def test_non_commuting_2x2_closed_form():
    # For 2x2 PSD A, B: tr sqrt(AB) = sqrt(tr(AB) + 2 sqrt(det A det B)).
    a = np.array([[2.0, 1.0], [1.0, 2.0]])
    b = np.array([[1.0, 0.0], [0.0, 3.0]])
    assert not np.allclose(a @ b, b @ a)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([1.5, 1.0])
    tr_sqrt = np.sqrt(np.trace(a @ b) + 2 * np.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    expected = 1.0 + 4.0 + np.trace(a) + np.trace(b) - 2 * tr_sqrt
    assert frechet_distance(mu1, a, mu2, b).fid == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dim", [16, 128])
def test_matches_scipy_sqrtm_form(dim):
    rng = np.random.default_rng(dim)
    s1, s2 = random_spd(rng, dim, 4 * dim), random_spd(rng, dim, 3 * dim) * 1.7
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) * 0.1
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours.fid == pytest.approx(ttur_frechet(mu1, s1, mu2, s2), rel=1e-9)
    assert ours.eps_used == 0.0


def test_rank_deficient_covariances_are_exact():
    # Fewer samples than dimensions, as in small evaluations: both covariances are singular. In the sample
    # space the answer is exact: tr sqrt(S1 S2) = ||A1 A2^T||_* / sqrt((n1 - 1)(n2 - 1)) (A: centred samples).
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 256)), rng.standard_normal((12, 256)) + 0.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    a, b = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(9 * 11)
    d = x.mean(0) - y.mean(0)
    exact = d @ d + np.trace(s1) + np.trace(s2) - 2 * nuclear
    ours = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert ours.fid == pytest.approx(exact, rel=1e-12)
    assert ours.fid == pytest.approx(ttur_frechet(x.mean(0), s1, y.mean(0), s2), rel=1e-6)  # sqrtm is coarser here


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(1)
    s = random_spd(rng, 32, 100)
    assert abs(frechet_distance(np.ones(32), s, np.ones(32), s).fid) < 1e-9


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="incompatible"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_moments_equal_numpy_mean_and_unbiased_cov():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((37, 8)).astype(np.float32) + 0.5
    m = FeatureMoments(dim=8)
    for part in np.array_split(f, 5):  # uneven batches
        m.add(torch.from_numpy(part))
    mu, sigma = m.mean_cov()
    f64 = f.astype(np.float64)
    np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False), rtol=1e-11, atol=1e-14)
    assert mu.dtype == sigma.dtype == np.float64


def test_moments_reject_wrong_shapes_and_tiny_counts():
    m = FeatureMoments(dim=4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        m.add(torch.zeros(2, 5))
    m.add(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        m.mean_cov()


def test_all_reduce_without_process_group_is_identity():
    rng = np.random.default_rng(3)
    a, b = FeatureMoments(dim=3), FeatureMoments(dim=3)
    a.add(torch.from_numpy(rng.standard_normal((4, 3))))
    b.add(torch.from_numpy(rng.standard_normal((6, 3))))
    before = [(m.count.clone(), m.sum.clone(), m.outer.clone()) for m in (a, b)]
    all_reduce_moments([a, b])
    for m, (c, s, o) in zip((a, b), before):
        assert torch.equal(m.count, c) and torch.equal(m.sum, s) and torch.equal(m.outer, o)


def test_precomputed_root_gives_the_same_distance():
    rng = np.random.default_rng(4)
    s1, s2 = random_spd(rng, 24, 60), random_spd(rng, 24, 50)
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    root = psd_sqrt(torch.from_numpy(s1))
    torch.testing.assert_close(root @ root, torch.from_numpy(s1), rtol=1e-10, atol=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2, sigma1_sqrt=root).fid == frechet_distance(mu1, s1, mu2, s2).fid
    # The distance is symmetric in its two arguments (up to round-off).
    assert frechet_distance(mu2, s2, mu1, s1).fid == pytest.approx(frechet_distance(mu1, s1, mu2, s2).fid, rel=1e-11)
