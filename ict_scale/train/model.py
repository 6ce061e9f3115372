"""Build the consistency model a config describes: registry backbone inside the iCT parameterisation."""
from __future__ import annotations

from ict_scale.data.config import label_dim
from ict_scale.ict import ConsistencyModel
from ict_scale.networks import build_network, network_c_noise, network_kwargs

_OVERRIDES = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "head_channels", "dropout")


def network_args(cfg) -> dict:
    """The backbone's full constructor arguments: the named network's preset with the config's values on top."""
    overrides = {k: getattr(cfg.model, k) for k in _OVERRIDES if getattr(cfg.model, k) is not None}
    for k in ("channel_mult", "attn_resolutions"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return network_kwargs(cfg.model.name, img_resolution=cfg.data.resolution, in_channels=3,
                          label_dim=label_dim(cfg.data), fp32_conditioning=cfg.model.fp32_conditioning,
                          **overrides)


def build_model(cfg) -> ConsistencyModel:
    net = build_network(cfg.model.name, **network_args(cfg))
    return ConsistencyModel(net, network_c_noise(cfg.model.name), sigma_data=cfg.ict.sigma_data,
                            sigma_min=cfg.ict.sigma_min)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
