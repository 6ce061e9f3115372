"""The eval section of the run configuration (composed into the top-level schema as `eval`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, get_args

FeatureName = Literal["inception", "classifier"]
FEATURE_EXTRACTORS: tuple[str, ...] = get_args(FeatureName)  # closed registry; eval.features names one


@dataclass
class EvalConfig:
    """FID evaluation during and after training; a field's comment is its documentation."""
    every_steps: int = 0               # steps between FID evaluations during training (0 = never)
    num: int = 50000                   # generated samples per evaluation (the paper's FID-50k)
    steps: List[int] = field(default_factory=lambda: [1, 2])  # sampling steps to score in the same pass (1 and/or 2)
    sigma_mid: float = 0.821           # two-step intermediate level (0.821 CIFAR-10, 1.526 ImageNet-64); also used by grids
    inception_weights: str = ""        # path/URL of pt_inception-2015-12-05-6726825d.pth; "" = $ICT_INCEPTION_WEIGHTS
    inception_sha256: str = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # expected file; "" accepts other weights (FIDs then not comparable with published ones)
    features: FeatureName = "inception"  # inception (FID, the published protocol) | classifier (FCD, offline)
    classifier_weights: str = ""       # features=classifier: .safetensors from `python -m data_prep.train_classifier`
    ref: str = ""                      # reference statistics (.npz: ours, EDM's mu/sigma, or ADM's reference batch)
    batch_per_rank: int = 256          # samples generated and scored per forward on each rank
    precision_recall: bool = False     # also compute improved precision/recall (k=3); the ref file must hold features
    seed: int = 0                      # sample i's noise and label come from (seed, i) alone, at any world size


def check_eval_config(cfg: EvalConfig) -> None:
    """Reject values the evaluation cannot run with, naming the key."""
    if cfg.features not in FEATURE_EXTRACTORS:
        raise ValueError(f"eval.features={cfg.features!r}: expected one of {list(FEATURE_EXTRACTORS)}")
    if cfg.num < 2:
        raise ValueError(f"eval.num={cfg.num}: need at least 2 samples for a covariance")
    if not cfg.steps or any(k not in (1, 2) for k in cfg.steps) or len(set(cfg.steps)) != len(cfg.steps):
        raise ValueError(f"eval.steps={list(cfg.steps)}: expected distinct values from [1, 2]")
    if cfg.batch_per_rank < 1:
        raise ValueError(f"eval.batch_per_rank={cfg.batch_per_rank}: expected >= 1")
    if cfg.every_steps < 0:
        raise ValueError(f"eval.every_steps={cfg.every_steps}: expected >= 0")
    if cfg.seed < 0:
        raise ValueError(f"eval.seed={cfg.seed}: expected a non-negative integer")
    if not cfg.sigma_mid > 0:
        raise ValueError(f"eval.sigma_mid={cfg.sigma_mid}: expected a positive noise level")
