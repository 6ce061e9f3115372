"""Consistency-model parameterisation f(x, s) = c_skip x + c_out F(c_in x, c_noise) (iCT §2, EDM Table 1)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .schedule import SIGMA_DATA, SIGMA_MIN


def boundary_scalings(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """(c_skip, c_out, c_in) with the sigma_min shift, so that f(x, sigma_min) = x exactly (CM eq. 6)."""
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_in = 1.0 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in


class ConsistencyModel(nn.Module):
    """Wraps a backbone F(x, noise_labels, class_labels); owns every sigma-dependent scaling.

    The scalings are computed in float32 even under bf16 autocast: c_skip * x is the whole output
    near sigma_min, so its precision is the precision of the sample.
    """

    def __init__(self, net: nn.Module, c_noise: Callable[[torch.Tensor], torch.Tensor],
                 sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
        super().__init__()
        self.net = net
        self.c_noise = c_noise
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        x = x.to(torch.float32)
        c_skip, c_out, c_in = boundary_scalings(sigma, self.sigma_data, self.sigma_min)
        F_x = self.net(c_in * x, self.c_noise(sigma.flatten()), class_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)
