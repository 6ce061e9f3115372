"""What a resumed run must share with the checkpoint it continues, and what it may change.

Refused (the run would silently become another run): the recipe keys in RESUME_INVARIANTS, and data whose
identity (the loader's fingerprint: shard names and sample counts, or the synthetic set's parameters)
differs. A moved copy of the same shards resumes: `data.source` is where the data is, the fingerprint is
what it is. Applied (and reported): the optimiser settings of OPTIM_SETTINGS, which the optimiser's saved
state would otherwise bring back while config.yaml records the new values. Everything else (logging,
parallelism, batch per GPU, workers) may change freely.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from ict_scale.config import Config, ConfigError

# These set the model, N(k), the randomness and the data order (sample i of epoch e is a function of
# train.seed, data.shuffle, the shard list and the global batch; see data/order.py).
RESUME_INVARIANTS = ("ict", "model", "train.total_steps", "train.batch_size", "train.seed", "data.shuffle",
                     "data.resolution", "data.num_classes", "data.drop_labels", "data.synthetic_seed")

# optimiser param_group key -> the config key(s) it comes from (see apply_optim_settings)
OPTIM_SETTINGS = {"lr": "optim.lr", "betas": "optim.beta1/beta2", "eps": "optim.eps",
                  "weight_decay": "optim.weight_decay"}


def _plain(node):
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def invariant_diffs(cfg, saved) -> list[str]:
    defaults = OmegaConf.structured(Config)
    diffs = []
    for key in RESUME_INVARIANTS:
        old, new = _plain(OmegaConf.select(saved, key)), _plain(OmegaConf.select(cfg, key))
        if isinstance(old, dict) and isinstance(new, dict):
            # A key added to a section after the checkpoint was written (e.g. ict.teacher) reads as its
            # default, which is what that run used: old checkpoints stay resumable.
            old = {**_plain(OmegaConf.select(defaults, key)), **old}
        elif old is None and "." in key:
            old = _plain(OmegaConf.select(defaults, key))  # a top-level key the old config did not have yet
        if old != new:
            diffs.append(f"{key}: checkpoint {old!r}, now {new!r}")
    return diffs


def judge_data(old_source: str, new_source: str, saved_fingerprint: str | None,
               fingerprint: str | None) -> tuple[str | None, str | None]:
    """(why the data is not the checkpoint's, or None; a note, or None). The fingerprint is the data's identity:
    `data.source` is only where it is. Without both fingerprints (a loader that has none), the source decides."""
    if saved_fingerprint is None or fingerprint is None:
        if old_source != new_source:
            return f"the config changed (data.source: checkpoint {old_source!r}, now {new_source!r})", None
        return None, None
    if saved_fingerprint != fingerprint:
        return (f"the data differs: data.source={new_source!r} holds other samples (fingerprint {fingerprint}) "
                f"than the checkpoint's data.source={old_source!r} (fingerprint {saved_fingerprint})"), None
    if old_source != new_source:
        return None, (f"data.source moved: checkpoint {old_source!r}, now {new_source!r}; the same shards "
                      f"(fingerprint {fingerprint}), so the sample order continues")
    return None, None


def check_resume_config(cfg, saved_yaml: str, ckpt_url: str, saved_fingerprint: str | None = None,
                        fingerprint: str | None = None) -> list[str]:
    """Refuse to continue a checkpoint under a config that would silently change the run; return notes.

    With both fingerprints given, the data is judged by content: a different `data.source` holding the same
    shards resumes (with a note); different shards are refused whatever the source says.
    """
    saved = OmegaConf.create(saved_yaml)
    diffs = invariant_diffs(cfg, saved)
    problem, note = judge_data(OmegaConf.select(saved, "data.source"), cfg.data.source, saved_fingerprint,
                               fingerprint)
    problems = ([f"the config changed ({'; '.join(diffs)})"] if diffs else []) + ([problem] if problem else [])
    if problems:
        raise ConfigError(f"cannot resume {ckpt_url}: {'; and '.join(problems)}; set those values back, or give "
                          f"this run a new train.run_dir")
    return [note] if note else []


def _shown(value) -> str:
    return f"({', '.join(f'{v:g}' for v in value)})" if isinstance(value, tuple) else f"{value:g}"


def apply_optim_settings(param_groups: list[dict], optim_cfg) -> list[str]:
    """Put the config's optimiser settings into restored param groups; return what changed, for the log.

    Loading an optimiser's state brings back the values it was saved with; a lower optim.lr on resume is a
    common, deliberate change, so the config wins (and config.yaml then records what is used).
    """
    wanted = {"lr": float(optim_cfg.lr), "betas": (float(optim_cfg.beta1), float(optim_cfg.beta2)),
              "eps": float(optim_cfg.eps), "weight_decay": float(optim_cfg.weight_decay)}
    changes = []
    for key, new in wanted.items():
        groups = [g for g in param_groups if key in g]
        olds = {tuple(g[key]) if key == "betas" else g[key] for g in groups}
        for g in groups:
            g[key] = new
        if olds and olds != {new}:
            changes.append(f"{OPTIM_SETTINGS[key]} {', '.join(map(_shown, sorted(olds)))} -> {_shown(new)}")
    return changes
