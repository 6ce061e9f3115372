"""Which feature network an evaluation uses, and what its protocol dict says about it.

A feature network is a callable uint8 (N, 3, H, W) -> float32 (N, D) with `dim` (D), `metric` (the name of
the distance it gives: "fid" or "fcd") and `protocol` (a dict recorded in results and reference statistics:
`extractor`, `metric`, `feature_dim`, `weights_sha256`, ...). Protocols written before the extractor was
swappable, and EDM's and ADM's reference files, name no extractor: they are Inception's.
"""
from __future__ import annotations

import torch

from .classifier import build_classifier_features
from .config import FEATURE_EXTRACTORS, EvalConfig
from .frechet import FEATURE_DIM
from .inception import build_inception

METRIC_BY_EXTRACTOR = {"inception": "fid", "classifier": "fcd"}


def extractor_of(protocol: dict) -> str:
    return protocol.get("extractor", "inception")


def feature_dim_of(protocol: dict) -> int:
    return int(protocol.get("feature_dim", FEATURE_DIM))


def metric_of(protocol: dict) -> str:
    return METRIC_BY_EXTRACTOR[extractor_of(protocol)]


def build_features(cfg: EvalConfig, device: torch.device | str, storage_options: dict | None = None,
                   random_inception: int | None = None):
    """The feature network eval.features names, from its configured weights; `random_inception` (a seed)
    gives Inception seeded random weights instead (tests and timing only)."""
    if cfg.features == "classifier":
        if random_inception is not None:
            raise ValueError("random Inception weights (--random-inception) apply to eval.features=inception only, "
                             "got eval.features=classifier")
        return build_classifier_features(cfg.classifier_weights, device, storage_options=storage_options)
    if cfg.features == "inception":
        return build_inception(cfg.inception_weights, device, sha256=cfg.inception_sha256 or None,
                               storage_options=storage_options, random_seed=random_inception)
    raise ValueError(f"eval.features={cfg.features!r}: expected one of {list(FEATURE_EXTRACTORS)}")
