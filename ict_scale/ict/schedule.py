"""Noise-level discretisation, curriculum and sampling distribution of iCT (Song & Dhariwal 2023, §3.3-3.5).

All schedule quantities are computed in float64 and are pure functions of their arguments: a resumed
run recomputes exactly what an uninterrupted run would have used.
"""
from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5
S0 = 10
S1 = 1280
P_MEAN = -1.1
P_STD = 2.0


def karras_sigmas(num_scales: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """Karras et al. boundaries sigma_1 < ... < sigma_N (iCT eq. 5), float64, ascending."""
    if num_scales < 2:
        raise ValueError(f"num_scales must be >= 2, got {num_scales}")
    i = torch.arange(num_scales, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + i / (num_scales - 1) * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # exact endpoints, not their rounded powers
    return sigmas


def doubling_period(total_steps: int, s0: int = S0, s1: int = S1) -> int:
    """K' = floor(K / (log2 floor(s1/s0) + 1)): steps per curriculum stage (iCT eq. 6)."""
    return max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))


def num_scales_at(step: int, total_steps: int, s0: int = S0, s1: int = S1) -> int:
    """Exponential curriculum N(k) = min(s0 * 2^floor(k/K'), s1) + 1 (iCT eq. 6)."""
    stage = step // doubling_period(total_steps, s0, s1)
    return min(s0 * 2 ** min(stage, 62), s1) + 1


def num_scales_sqrt_at(step: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """Original CT curriculum N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (Song et al. 2023, App. C).

    The trainer passes ict.s0/ict.s1, whose defaults are iCT's (10, 1280); original CT used 2 and 150.
    """
    inner = step / total_steps * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2
    return math.ceil(math.sqrt(inner) - 1) + 1


def ct_teacher_decay(num_scales: int, s0: int, mu0: float) -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)): original CT's EMA-teacher rate (Song et al. 2023, App. C, Table 3), float64.

    s0 is the curriculum's initial N, so mu(0) = mu0 and mu rises towards 1 as N(k) grows. mu0 = 0 gives
    mu = 0, i.e. theta^- = theta: iCT's teacher (Song & Dhariwal 2023, §3.2).
    """
    if not 0.0 <= mu0 < 1.0:
        raise ValueError(f"mu0 must be in [0, 1), got {mu0}")
    if num_scales < 1 or s0 < 1:
        raise ValueError(f"num_scales and s0 must be >= 1, got {num_scales}, {s0}")
    if mu0 == 0.0:
        return 0.0  # the limit of exp(s0 ln(mu0) / N) as mu0 -> 0; ln(0) itself is -inf
    return math.exp(s0 * math.log(mu0) / num_scales)


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """p(i) ∝ erf((ln s_{i+1} - P_mean)/(√2 P_std)) - erf((ln s_i - P_mean)/(√2 P_std)) (iCT eq. 7), float64."""
    cdf = torch.erf((torch.log(sigmas.to(torch.float64)) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def ict_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) for the N-1 intervals (iCT §3.4), float64."""
    sigmas = sigmas.to(torch.float64)
    return 1.0 / (sigmas[1:] - sigmas[:-1])
