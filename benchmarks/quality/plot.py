"""Curves and the ablation table of the quality runs (benchmarks/quality/run_ablation.sh).

    python benchmarks/quality/plot.py RUNS_DIR --out benchmarks/results/quality

RUNS_DIR holds one run directory per variant (metrics.jsonl, config.yaml, samples/). Writes
fcd_curves.png (FCD of one- and two-step samples against images seen), loss_curves.png, ablation.json,
ablation.md, and copies each run's last sample grids to grids/<variant>_<k>step.png.
Needs matplotlib (pip install -e .[plots]).
"""
from __future__ import annotations

import argparse
import io
import json
import os

import matplotlib
import yaml

from ict_scale.checkpoint import Storage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

ORDER = ("ict", "l2", "uniform", "ema_teacher", "sqrt", "no_dropout")
LABELS = {"ict": "iCT (all changes)", "l2": "squared L2 metric", "uniform": "uniform index sampling",
          "ema_teacher": "EMA teacher (CT)", "sqrt": "sqrt curriculum (CT)", "no_dropout": "no dropout"}


def load_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    batch = int(cfg["train"]["batch_size"])
    evals, train = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            (evals if "fcd_1step" in rec else train if "loss" in rec else []).append(rec)
    # A resumed run may repeat the evaluation of the step it resumed at: keep the last line per step.
    evals = sorted({r["step"]: r for r in evals}.values(), key=lambda r: r["step"])
    train = sorted({r["step"]: r for r in train}.values(), key=lambda r: r["step"])
    return {"batch": batch, "total_steps": int(cfg["train"]["total_steps"]), "evals": evals, "train": train}


def summary(name: str, run: dict, common_step: int) -> dict:
    """Scores at `common_step` (the last step every variant evaluated), so rows compare equal budgets."""
    evals, train = run["evals"], run["train"]
    best = min(evals, key=lambda r: r["fcd_1step"]) if evals else None
    last = next((r for r in evals if r["step"] == common_step), {})
    rates = [r["img_per_s"] for r in train if "img_per_s" in r]
    return {"variant": name, "steps_done": train[-1]["step"] if train else 0, "total_steps": run["total_steps"],
            "images_seen_M": (train[-1]["step"] if train else 0) * run["batch"] / 1e6,
            "common_step": common_step, "images_at_common_M": common_step * run["batch"] / 1e6,
            "fcd_1step": last.get("fcd_1step"), "fcd_2step": last.get("fcd_2step"),
            "last_eval_step": evals[-1]["step"] if evals else None,
            "best_fcd_1step": best["fcd_1step"] if best else None, "best_step": best["step"] if best else None,
            "final_loss": train[-1]["loss"] if train else None,
            "median_img_per_s": sorted(rates)[len(rates) // 2] if rates else None,
            "evals": [{k: r[k] for k in ("step", "fcd_1step", "fcd_2step") if k in r} for r in evals]}


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[dict], hardware: str) -> str:
    step = rows[0]["common_step"]
    source = (f"From the runs of `benchmarks/quality/run_ablation.sh` on {hardware or 'unrecorded hardware'}, by "
              f"`python benchmarks/quality/plot.py RUNS --out benchmarks/results/quality --hardware '{hardware}'`. "
              "img/s per run: median of the trainer's log lines.\n\n")
    head = (f"| variant | FCD 1-step @ step {step} | FCD 2-step @ step {step} | best FCD 1-step (step) | "
            "steps run / planned | img/s per run |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS.get(r['variant'], r['variant'])} | {_fmt(r['fcd_1step'])} | {_fmt(r['fcd_2step'])} | "
                     f"{_fmt(r['best_fcd_1step'])} ({r['best_step']}) | {r['steps_done']}/{r['total_steps']} | "
                     f"{_fmt(r['median_img_per_s'], 0)} |")
    return source + "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], out: Storage) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, run) in enumerate(runs.items()):
        colour = f"C{i}"
        x = [r["step"] * run["batch"] / 1e6 for r in run["evals"]]
        ax.plot(x, [r["fcd_1step"] for r in run["evals"]], "-o", color=colour,
                label=f"{LABELS.get(name, name)}, 1 step")
        if run["evals"] and "fcd_2step" in run["evals"][0]:
            ax.plot(x, [r["fcd_2step"] for r in run["evals"]], "--", color=colour, alpha=0.6)
    _finish(fig, ax, out, "fcd_curves.png", ylabel="FCD (lower is better)",
            title="FCD of one-step (solid) and two-step (dashed) samples, 5k samples each")
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, run) in enumerate(runs.items()):
        ax.plot([r["step"] * run["batch"] / 1e6 for r in run["train"]], [r["loss"] for r in run["train"]],
                color=f"C{i}", label=LABELS.get(name, name), lw=0.8)
    _finish(fig, ax, out, "loss_curves.png", ylabel="training loss",
            title="training loss (each variant's own metric and weighting: not comparable across metrics)")


def _finish(fig, ax, out: Storage, name: str, ylabel: str, title: str) -> None:
    ax.set(xlabel="images seen (millions)", ylabel=ylabel, yscale="log", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    out.write_bytes(name, png.getvalue())  # atomic, like every other result file


def copy_last_grids(run_dir: str, out: Storage, name: str) -> None:
    """The run's last one- and two-step grids as grids/<name>_<k>step.png under `out`."""
    for k in (1, 2):
        grid = os.path.join(run_dir, "samples", f"latest_{k}step.png")
        if os.path.exists(grid):
            with open(grid, "rb") as f:
                out.write_bytes(f"grids/{name}_{k}step.png", f.read())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir")
    p.add_argument("--out", default="benchmarks/results/quality")
    p.add_argument("--hardware", default="", help="where the runs ran, for the table's header (e.g. the GPU model)")
    args = p.parse_args(argv)
    names = [n for n in ORDER if os.path.exists(os.path.join(args.runs_dir, n, "metrics.jsonl"))]
    names += sorted(n for n in os.listdir(args.runs_dir) if n not in names
                    and os.path.exists(os.path.join(args.runs_dir, n, "metrics.jsonl")))
    if not names:
        raise SystemExit(f"{args.runs_dir}: no run directory with a metrics.jsonl")
    runs = {n: load_run(os.path.join(args.runs_dir, n)) for n in names}
    common_step = min(r["evals"][-1]["step"] if r["evals"] else 0 for r in runs.values())
    rows = [summary(n, r, common_step) for n, r in runs.items()]
    out = Storage(args.out)
    out.write_text("ablation.json", json.dumps(rows, indent=1) + "\n")
    out.write_text("ablation.md", markdown(rows, args.hardware))
    plot(runs, out)
    for n in names:
        copy_last_grids(os.path.join(args.runs_dir, n), out, n)
    print(markdown(rows, args.hardware))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
