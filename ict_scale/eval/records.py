"""What an evaluation leaves in the run directory (rank 0 only; every write through the atomic Storage):

- metrics.jsonl  one line per evaluation: step, <metric>_<k>step for each k, num, seconds (+ precision/recall)
- fid.json       the latest evaluation in full (protocol, reference, timings); fcd.json for the classifier's FCD
- best.json      the checkpoint with the lowest distance so far (by the smallest step count evaluated)

<metric> is fid (Inception features) or fcd (the classifier's, see classifier.py); one run uses one.
"""
from __future__ import annotations

import json

from ict_scale.checkpoint import Storage, strict_json

from .features import METRIC_BY_EXTRACTOR

_LINE_KEYS = ("step", "num", "seconds")
METRICS = tuple(METRIC_BY_EXTRACTOR.values())  # the result keys' prefixes: fid, fcd
_DISTANCE_PREFIXES = tuple(f"{m}_" for m in METRICS)


def _steps_of(key: str) -> int | None:
    """k of '<metric>_<k>step', else None."""
    metric, _, rest = key.partition("_")
    if metric in METRICS and rest.endswith("step") and rest[:-len("step")].isdigit():
        return int(rest[:-len("step")])
    return None


def best_metric(result: dict) -> str:
    """The distance that ranks checkpoints: fewest sampling steps evaluated (one-step when present)."""
    keys = sorted((k for k in result if _steps_of(k) is not None), key=_steps_of)
    if not keys:
        raise ValueError(f"no fid_<k>step or fcd_<k>step entry in result keys {sorted(result)}")
    return keys[0]


def metrics_line(result: dict) -> dict:
    line = {k: result[k] for k in _LINE_KEYS if k in result}
    line.update({k: v for k, v in result.items() if k.startswith(_DISTANCE_PREFIXES + ("precision_", "recall_"))})
    return line


def record_result(run_dir: str, result: dict, checkpoint: str | None = None,
                  storage_options: dict | None = None) -> dict | None:
    """Append the metrics line, write fid.json (or fcd.json) and update best.json; return the best record.

    best.json is replaced when the ranking metric changes (another extractor or step count): values of two
    metrics are never compared.
    """
    storage = Storage(run_dir, storage_options)
    storage.makedirs()
    storage.append_record("metrics.jsonl", metrics_line(result))
    metric = best_metric(result)
    latest = f"{metric.partition('_')[0]}.json"
    storage.write_text(latest, strict_json({**result, "checkpoint": checkpoint}, indent=2, sort_keys=True))
    best = json.loads(storage.read_bytes("best.json")) if storage.exists("best.json") else None
    if best is not None and best.get("metric") == metric and best["value"] <= result[metric]:
        return best
    best = {"metric": metric, "value": result[metric], "checkpoint": checkpoint, "step": result.get("step"),
            **{k: v for k, v in result.items() if k.startswith(_DISTANCE_PREFIXES)}}
    storage.write_text("best.json", json.dumps(best, indent=2, sort_keys=True))
    return best
