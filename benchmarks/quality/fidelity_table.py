"""The fast-path A/B table of QUALITY.md from the runs of benchmarks/quality/run_fidelity.sh.

    python benchmarks/quality/fidelity_table.py RUNS_DIR --out benchmarks/results/quality_fidelity --hardware 'one H200'

RUNS_DIR holds run directories named <variant>_s<seed> (metrics.jsonl, config.yaml, samples/). For each variant:
FCD at every evaluation, per seed; the seed spread (max - min) at the last step every run evaluated; and whether
each configuration's seeds fall inside fp32 eager's range widened by fp32 eager's own spread. Writes
fidelity.json, fidelity.md, fcd_curves.png and each run's last grids. Needs matplotlib (pip install -e .[plots]).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys

import matplotlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import copy_last_grids, load_run  # noqa: E402  (the quality runs' shared reader)

from ict_scale.checkpoint import Storage  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

REFERENCE = "fp32_eager"
ORDER = (REFERENCE, "bf16_eager", "bf16_tuned", "fsdp_tuned", "bf16_tuned_bf16_conditioning")
LABELS = {"fp32_eager": "fp32, eager", "bf16_eager": "bf16, eager", "bf16_tuned": "bf16, compiled (tuned)",
          "fsdp_tuned": "FSDP2, bf16, compiled", "bf16_tuned_bf16_conditioning":
          "bf16, compiled, bf16 conditioning and no-grad teacher graph (before)"}
RUN_NAME = re.compile(r"^(?P<variant>.+)_s(?P<seed>\d+)$")


def group_runs(runs_dir: str) -> dict[str, dict[int, dict]]:
    """{variant: {seed: run}} for every <variant>_s<seed> folder with a metrics.jsonl."""
    variants: dict[str, dict[int, dict]] = {}
    for name in sorted(os.listdir(runs_dir)):
        m = RUN_NAME.match(name)
        if m and os.path.exists(os.path.join(runs_dir, name, "metrics.jsonl")):
            run = load_run(os.path.join(runs_dir, name))
            variants.setdefault(m["variant"], {})[int(m["seed"])] = run
    return dict(sorted(variants.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)))


def fcd_at(run: dict, step: int, key: str) -> float | None:
    return next((r[key] for r in run["evals"] if r["step"] == step and r.get(key) is not None), None)


def rows_at(variants: dict[str, dict[int, dict]], step: int) -> list[dict]:
    ref = variants.get(REFERENCE, {})
    rows = []
    for variant, seeds in variants.items():
        row = {"variant": variant, "step": step, "seeds": sorted(seeds)}
        for k in ("fcd_1step", "fcd_2step"):
            values = [fcd_at(run, step, k) for run in seeds.values()]
            values = [v for v in values if v is not None]
            row[k] = values
            row[k + "_mean"] = sum(values) / len(values) if values else None
            row[k + "_spread"] = max(values) - min(values) if len(values) > 1 else None
            ref_values = [v for v in (fcd_at(run, step, k) for run in ref.values()) if v is not None]
            if len(ref_values) > 1 and values:
                # fp32 eager's seeds give the spread two runs of the same computation show; a configuration is
                # "within it" when all its seeds lie in fp32 eager's range widened by that spread on each side.
                spread = max(ref_values) - min(ref_values)
                lo, hi = min(ref_values) - spread, max(ref_values) + spread
                row[k + "_within_fp32_spread"] = all(lo <= v <= hi for v in values)
        rates = [r["img_per_s"] for run in seeds.values() for r in run["train"] if "img_per_s" in r]
        row["median_img_per_s_per_run"] = sorted(rates)[len(rates) // 2] if rates else None
        row["steps_done"] = [run["train"][-1]["step"] if run["train"] else 0 for run in seeds.values()]
        rows.append(row)
    return rows


def _fmt(values, digits=2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values) if values else "-"


def markdown(rows: list[dict], hardware: str) -> str:
    step = rows[0]["step"]
    lines = [f"Runs of `benchmarks/quality/run_fidelity.sh` on {hardware or 'unrecorded hardware'}; table by "
             f"`python benchmarks/quality/fidelity_table.py RUNS --hardware '{hardware}'`. FCD at step {step}, "
             "one value per seed (seed 0 / seed 1); spread = max - min; 'within' = every seed inside fp32 eager's "
             "range widened by its spread.", "",
             "| configuration | FCD 1-step | spread | within | FCD 2-step | spread | within |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for k in ("fcd_1step", "fcd_2step"):
            within = r.get(k + "_within_fp32_spread")
            cells += [_fmt(r[k]), _fmt([r[k + "_spread"]] if r[k + "_spread"] is not None else []),
                      "-" if within is None or r["variant"] == REFERENCE else ("yes" if within else "**no**")]
        lines.append(f"| {LABELS.get(r['variant'], r['variant'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(variants: dict[str, dict[int, dict]], out: Storage) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("fcd_1step", "fcd_2step"), ("one-step", "two-step")):
        for i, (variant, seeds) in enumerate(variants.items()):
            for j, (seed, run) in enumerate(sorted(seeds.items())):
                ev = [r for r in run["evals"] if r.get(key) is not None]
                ax.plot([r["step"] for r in ev], [r[key] for r in ev], "-o" if j == 0 else "--s", color=f"C{i}",
                        ms=3, label=f"{LABELS.get(variant, variant)}, seed {seed}")
        ax.set(xlabel="step", ylabel="FCD (lower is better)", yscale="log", title=f"FCD of {title} samples")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    out.write_bytes("fcd_curves.png", png.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir")
    p.add_argument("--out", default="benchmarks/results/quality_fidelity")
    p.add_argument("--hardware", default="")
    args = p.parse_args(argv)
    variants = group_runs(args.runs_dir)
    if not variants:
        raise SystemExit(f"{args.runs_dir}: no <variant>_s<seed> run directory with a metrics.jsonl")
    step = min(run["evals"][-1]["step"] if run["evals"] else 0 for s in variants.values() for run in s.values())
    rows = rows_at(variants, step)
    every = sorted({r["step"] for s in variants.values() for run in s.values() for r in run["evals"]})
    out = Storage(args.out)
    out.write_text("fidelity.json", json.dumps({"hardware": args.hardware, "common_step": step, "rows": rows,
                                                "by_step": {st: rows_at(variants, st) for st in every}},
                                               indent=1) + "\n")
    out.write_text("fidelity.md", markdown(rows, args.hardware))
    plot(variants, out)
    for variant, seeds in variants.items():
        for seed in seeds:
            copy_last_grids(os.path.join(args.runs_dir, f"{variant}_s{seed}"), out, f"{variant}_s{seed}")
    print(markdown(rows, args.hardware))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
