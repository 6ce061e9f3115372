"""Feature statistics in float64 and the Frechet distance between two Gaussians (FID, Heusel et al. 2017).

Per rank we keep n, sum f and sum f f^T in float64; every set of statistics of one evaluation is packed
into ONE flat buffer and summed over ranks with ONE all-reduce, so the result is a sum over samples that
does not depend on how samples were split between ranks (up to float64 rounding of the final additions).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ict_scale.parallel import comm

FEATURE_DIM = 2048  # Inception-v3 pool3


class FeatureMoments:
    """Running n, sum(f) and sum(f f^T) of feature vectors, in float64 on `device`."""

    def __init__(self, dim: int = FEATURE_DIM, device: torch.device | str = "cpu"):
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # exact for n < 2**53
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(features.shape)}")
        f = features.to(device=self.sum.device, dtype=torch.float64)  # products in float64, not fp32
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer.addmm_(f.T, f)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) with the unbiased covariance: (sum f f^T - n mu mu^T) / (n - 1)."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {n:.0f}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def all_reduce_moments(moments: list[FeatureMoments]) -> None:
    """Sum every FeatureMoments in `moments` over all ranks, in place, with a single all-reduce."""
    parts = [t for m in moments for t in (m.count.reshape(1), m.sum, m.outer.reshape(-1))]
    flat = comm.all_reduce_sum(torch.cat(parts))
    offset = 0
    for m in moments:
        for t in (m.count, m.sum, m.outer):
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@dataclass
class FrechetTerms:
    """The distance and its parts: fid = mean_term + trace_term."""
    fid: float
    mean_term: float     # ||mu1 - mu2||^2
    trace_term: float    # tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))
    eps_used: float      # the diagonal offset that was needed (0.0 normally)


def psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix via eigh; round-off negatives are clamped to 0."""
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _trace_sqrt_product(root1: torch.Tensor, s2: torch.Tensor) -> float:
    """tr((S1 S2)^(1/2)) as sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), given root1 = S1^(1/2).

    S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so their eigenvalues agree and are
    real: this is where the sqrtm form needs 'discard the tiny imaginary part'. Here round-off shows up as
    tiny eigenvalues of either sign instead; they are set to 0, and large negative ones (inputs that are
    not covariances) raise.
    """
    m = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((m + m.T) / 2)  # symmetrise away round-off so eigvalsh sees one matrix
    scale = max(float(eig.abs().max()), 1e-300)
    if float(eig.min()) < -1e-6 * scale:
        raise ValueError(f"covariance product has eigenvalue {float(eig.min()):.3e} (largest {scale:.3e}): "
                         f"the statistics are not positive semi-definite covariances")
    # Eigenvalues below D * eps * largest are round-off (numpy's matrix_rank tolerance). Their square roots
    # are not small (sqrt(1e-16) = 1e-8 each, times D), so they are set to 0, not kept: with fewer samples
    # than dimensions this is what makes the distance reproducible to round-off.
    floor = eig.shape[0] * torch.finfo(torch.float64).eps * scale
    return float(torch.where(eig > floor, eig, 0.0).sqrt().sum())


def _as_f64(a, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, dtype=torch.float64).to(device)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, *, sigma1_sqrt: torch.Tensor | None = None,
                     device: torch.device | str = "cpu") -> FrechetTerms:
    """d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 (Dowson & Landau 1982).

    `sigma1_sqrt` may carry a precomputed psd_sqrt(sigma1) (a fixed reference: one eigh saved per call).
    If an eigen-decomposition fails to converge on a near-singular product, eps * I is added to both
    covariances and the trace term recomputed (the customary offset); `eps_used` records it.
    """
    mu1, mu2, s1, s2 = (_as_f64(a, device) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"incompatible statistics: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    for name, t in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite entries")
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    eps_used = 0.0
    try:
        root1 = psd_sqrt(s1) if sigma1_sqrt is None else sigma1_sqrt.to(device=s1.device, dtype=torch.float64)
        tr_sqrt = _trace_sqrt_product(root1, s2)
    except torch.linalg.LinAlgError:
        eps_used = eps
        offset = eps * torch.eye(s1.shape[0], dtype=torch.float64, device=s1.device)
        tr_sqrt = _trace_sqrt_product(psd_sqrt(s1 + offset), s2 + offset)
    trace_term = float(torch.trace(s1) + torch.trace(s2)) - 2.0 * tr_sqrt  # traces of the unshifted inputs
    return FrechetTerms(mean_term + trace_term, mean_term, trace_term, eps_used)
