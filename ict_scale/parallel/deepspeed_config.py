"""A DeepSpeed config from a YAML/JSON file, with the keys the run owns filled in from `train.*`.

The file chooses the ZeRO stage, precision and communication knobs; the batch geometry comes from
the run config (global batch fixed, accumulation derived from the world size), so one file serves
every world size. `"auto"` in bf16.enabled follows train.precision.
"""
from __future__ import annotations

import json
import os

import yaml

_RUN_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def resolve_path(path: str) -> str:
    """`path` as given, else relative to the source tree (so configs/deepspeed/... works from any directory)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    in_tree = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", path))
    return in_tree if os.path.exists(in_tree) else path


def read_file(path: str) -> dict:
    path = resolve_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"parallel.deepspeed_config={path!r}: file not found (see configs/deepspeed/)")
    with open(path) as f:
        text = f.read()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"parallel.deepspeed_config={path!r}: cannot parse: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"parallel.deepspeed_config={path!r}: expected a mapping, got {type(values).__name__}")
    return values


def build_ds_config(path: str, *, batch_per_gpu: int, accumulation: int, world_size: int, precision: str,
                    on_gpu: bool) -> dict:
    """The dict handed to deepspeed.initialize; raises naming the file and key on bad values."""
    ds = read_file(path)
    clash = [k for k in _RUN_OWNED if k in ds]
    if clash:
        raise ValueError(f"{path}: {', '.join(clash)} come from train.batch_size / train.batch_per_gpu and the "
                         "world size; remove them from the DeepSpeed config")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage={stage!r}; expected 1, 2 or 3")
    ds["train_micro_batch_size_per_gpu"] = batch_per_gpu
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = batch_per_gpu * accumulation * world_size
    bf16, fp16 = dict(ds.get("bf16", {})), dict(ds.get("fp16", {}))
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = precision == "bf16"
    if fp16.get("enabled") and bf16.get("enabled"):
        raise ValueError(f"{path}: bf16.enabled and fp16.enabled are both true; choose one")
    if fp16.get("enabled") and not on_gpu:
        raise ValueError(f"{path}: fp16.enabled=true needs a GPU (DeepSpeed's CPU accelerator has no fp16)")
    if bf16.get("enabled"):
        # A non-finite gradient must make DeepSpeed skip the step (its overflow path), the same
        # contract as the other backends' divergence guard; bf16 has no loss scaler to do it.
        bf16["check_grad_overflow"] = True
    ds["bf16"], ds["fp16"] = bf16, fp16
    ds.setdefault("gradient_clipping", 0.0)     # iCT: no clipping
    ds.setdefault("steps_per_print", 1 << 30)   # the run logs; DeepSpeed's own step lines would duplicate it
    if "optimizer" not in ds:
        # The run's RAdam (the paper's optimiser) goes in as a client optimiser.
        ds["zero_allow_untested_optimizer"] = True
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def compute_dtype(ds: dict) -> str:
    """fp32, bf16 or fp16: the dtype DeepSpeed casts the module to."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
