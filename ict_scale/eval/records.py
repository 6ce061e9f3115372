"""What an evaluation leaves in the run directory (rank 0 only; every write through the atomic Storage):

- metrics.jsonl  one line per evaluation: step, fid_<k>step for each k, num, seconds (+ precision/recall)
- fid.json       the latest evaluation in full (protocol, reference, timings)
- best.json      the checkpoint with the lowest FID so far (by the smallest step count evaluated)
"""
from __future__ import annotations

import json

from ict_scale.checkpoint import Storage

_LINE_KEYS = ("step", "num", "seconds")


def best_metric(result: dict) -> str:
    """The FID that ranks checkpoints: fewest sampling steps evaluated (one-step when present)."""
    keys = sorted((k for k in result if k.startswith("fid_") and k.endswith("step")),
                  key=lambda k: int(k[len("fid_"):-len("step")]))
    if not keys:
        raise ValueError(f"no fid_<k>step entry in result keys {sorted(result)}")
    return keys[0]


def metrics_line(result: dict) -> dict:
    line = {k: result[k] for k in _LINE_KEYS if k in result}
    line.update({k: v for k, v in result.items() if k.startswith(("fid_", "precision_", "recall_"))})
    return line


def record_result(run_dir: str, result: dict, checkpoint: str | None = None,
                  storage_options: dict | None = None) -> dict | None:
    """Append the metrics line, write fid.json and update best.json; return the best record."""
    storage = Storage(run_dir, storage_options)
    storage.makedirs()
    storage.append_line("metrics.jsonl", json.dumps(metrics_line(result)))
    storage.write_text("fid.json", json.dumps({**result, "checkpoint": checkpoint}, indent=2, sort_keys=True))
    metric = best_metric(result)
    best = json.loads(storage.read_bytes("best.json")) if storage.exists("best.json") else None
    if best is not None and best.get("metric") == metric and best["value"] <= result[metric]:
        return best
    best = {"metric": metric, "value": result[metric], "checkpoint": checkpoint, "step": result.get("step"),
            **{k: v for k, v in result.items() if k.startswith("fid_")}}
    storage.write_text("best.json", json.dumps(best, indent=2, sort_keys=True))
    return best
