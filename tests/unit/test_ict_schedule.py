"""Check values of ICT_SPEC §3, §4 and §9: discretisation, curriculum, index distribution, weights."""
import math

import pytest
import torch

from ict_scale.ict import (doubling_period, ict_weights, karras_sigmas, lognormal_index_probs, num_scales_at,
                           num_scales_sqrt_at)

KARRAS_11 = [0.002, 0.016720753, 0.085087203, 0.31828329, 0.96541693, 2.5152190, 5.8389476, 12.381576,
             24.408342, 45.313734, 80.0]
LAMBDA_11 = [67.931307, 14.627058, 4.2882366, 1.5452759, 0.64524369, 0.30086692, 0.15284377, 0.083147874,
             0.047834548, 0.028829855]
P_11 = [0.06263, 0.18174, 0.24550, 0.21349, 0.14245, 0.08060, 0.04108, 0.01958, 0.00894, 0.00398]


def test_karras_boundaries_match_check_values():
    s = karras_sigmas(11)
    assert s.dtype == torch.float64
    assert torch.allclose(s, torch.tensor(KARRAS_11, dtype=torch.float64), rtol=1e-7, atol=0)
    assert s[0].item() == pytest.approx(0.002, rel=1e-12) and s[-1].item() == pytest.approx(80.0, rel=1e-12)
    assert torch.all(s[1:] > s[:-1])


def test_weights_match_check_values():
    lam = ict_weights(karras_sigmas(11))
    assert lam.dtype == torch.float64 and lam.shape == (10,)
    assert torch.allclose(lam, torch.tensor(LAMBDA_11, dtype=torch.float64), rtol=1e-7, atol=0)


def test_lognormal_probs_sum_to_one_and_match_spec():
    p = lognormal_index_probs(karras_sigmas(11))
    assert p.dtype == torch.float64
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(p, torch.tensor(P_11, dtype=torch.float64), atol=5e-6)
    for n in (21, 41, 1281):
        q = lognormal_index_probs(karras_sigmas(n))
        assert q.shape == (n - 1,) and q.sum().item() == pytest.approx(1.0, abs=1e-12) and torch.all(q > 0)


def test_lognormal_probs_follow_erf_formula():
    s = karras_sigmas(41)
    cdf = [math.erf((math.log(v) + 1.1) / (math.sqrt(2) * 2.0)) for v in s.tolist()]
    mass = [b - a for a, b in zip(cdf, cdf[1:])]
    expected = torch.tensor(mass, dtype=torch.float64) / sum(mass)
    assert torch.allclose(lognormal_index_probs(s), expected, rtol=1e-12)


def test_curriculum_paper_values():
    K = 400_000
    assert doubling_period(K) == 50_000
    assert num_scales_at(0, K) == 11
    assert num_scales_at(49_999, K) == 11
    assert num_scales_at(50_000, K) == 21
    assert num_scales_at(350_000, K) == 1281
    assert num_scales_at(399_999, K) == 1281
    assert sorted({num_scales_at(k, K) for k in range(0, K, 1000)}) == [11, 21, 41, 81, 161, 321, 641, 1281]


@pytest.mark.parametrize("total", [400_000, 800_000, 1000, 37])
def test_curriculum_transitions_at_multiples_of_period(total):
    kp = doubling_period(total)
    for m in range(1, 8):
        before, after = num_scales_at(m * kp - 1, total), num_scales_at(m * kp, total)
        assert after - 1 == min(2 * (before - 1), 1280), (m, before, after)
    assert num_scales_at(10 ** 9, total) == 1281  # capped at s1 + 1 forever after


def test_curriculum_is_a_pure_function_of_step():
    assert [num_scales_at(k, 1000) for k in range(1000)] == [num_scales_at(k, 1000) for k in range(1000)]


def test_sqrt_curriculum_of_original_ct():
    assert num_scales_sqrt_at(0, 1000) == 2
    assert num_scales_sqrt_at(1000, 1000) == 151
    values = [num_scales_sqrt_at(k, 1000) for k in range(1001)]
    assert values == sorted(values)


def test_bad_num_scales():
    with pytest.raises(ValueError, match="num_scales"):
        karras_sigmas(1)
