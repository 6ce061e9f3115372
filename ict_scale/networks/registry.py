"""The closed registry of paper networks (iCT §7) and their noise conditioning c_noise (iCT §2)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .adm import ADM, attention_channels
from .ncsnpp import NCSNpp


def c_noise_ncsnpp(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = 0.25 ln(sigma), fed to the Fourier embedding (iCT §2, EDM Table 1)."""
    return 0.25 * torch.log(sigma)


def c_noise_adm(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = 1000 * 0.25 ln(sigma + 1e-44), ADM's "timestep" scale (iCT §2); 1e-44 guards sigma = 0."""
    return 1000 * 0.25 * torch.log(sigma + 1e-44)


@dataclass(frozen=True)
class NetworkSpec:
    """A backbone class, the recipe's constructor arguments, and the c_noise(sigma) it expects."""
    cls: type[nn.Module]
    defaults: dict
    c_noise: Callable[[torch.Tensor], torch.Tensor]


_NCSNPP_CIFAR10 = dict(  # iCT §7, CIFAR-10: 56,395,523 parameters
    img_resolution=32, in_channels=3, label_dim=0, model_channels=128, channel_mult=(2, 2, 2),
    channel_mult_emb=4, channel_mult_noise=2, num_blocks=4, attn_resolutions=(16,), dropout=0.3,
    fourier_scale=0.02, fir_kernel=(1, 3, 3, 1),
)
_ADM_IMAGENET64 = dict(  # iCT §7, ImageNet-64: 295,899,267 parameters
    img_resolution=64, in_channels=3, label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
    channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8), head_channels=64, dropout=0.2,
    dropout_max_resolution=16,
)

NETWORKS: dict[str, NetworkSpec] = {
    "ncsnpp": NetworkSpec(NCSNpp, _NCSNPP_CIFAR10, c_noise_ncsnpp),
    "ncsnpp_deep": NetworkSpec(NCSNpp, {**_NCSNPP_CIFAR10, "num_blocks": 8}, c_noise_ncsnpp),  # 97,610,499
    "adm": NetworkSpec(ADM, _ADM_IMAGENET64, c_noise_adm),
    "adm_deep": NetworkSpec(ADM, {**_ADM_IMAGENET64, "num_blocks": 6}, c_noise_adm),  # 495,357,699
}


def _spec(name: str) -> NetworkSpec:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid names: {sorted(NETWORKS)}")
    return NETWORKS[name]


def _as_tuple(value):
    # YAML and CLI overrides give lists; the constructors compare and hash tuples.
    return tuple(value) if isinstance(value, list) else value


def network_kwargs(name: str, **overrides) -> dict:
    """The constructor arguments of registered network `name`: its recipe, overridden by keyword."""
    spec = _spec(name)
    valid = sorted(p for p in inspect.signature(spec.cls.__init__).parameters if p != "self")
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for network {name!r}; valid keys: {valid}")
    return {k: _as_tuple(v) for k, v in {**spec.defaults, **overrides}.items()}


def build_network(name: str, **overrides) -> nn.Module:
    """Build registered network `name` with its recipe, any constructor argument overridden by keyword."""
    return _spec(name).cls(**network_kwargs(name, **overrides))


def attention_mismatches(name: str, img_resolution: int, **overrides) -> list[tuple[int, int, int, int]]:
    """(level, resolution, channels, head_channels) of each attention layer of network `name` whose channels
    do not split into whole heads; checkable before any weight exists. NCSN++ has one head over all channels."""
    args = network_kwargs(name, **{**overrides, "img_resolution": img_resolution})
    if _spec(name).cls is not ADM:
        return []
    head = args["head_channels"]
    return [(level, res, ch, head) for level, res, ch in attention_channels(
        img_resolution, args["model_channels"], args["channel_mult"], args["attn_resolutions"]) if ch % head]


def network_c_noise(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The c_noise(sigma) that network `name` was built to read (iCT §2)."""
    return _spec(name).c_noise
