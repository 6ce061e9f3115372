"""Tables of benchmark results: rich on the console, Markdown for BENCHMARKS.md.

`python -m ict_scale.bench.report FILE.json [...]` prints the Markdown tables of saved results.
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

COLUMNS = ("mode", "loader", "backend", "GPUs", "batch/GPU", "img/s/GPU", "step ms", "MFU meas.", "MFU sheet",
           "peak GiB", "warm-up s", "data wait", "mean loss")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def row(r: dict) -> list[str]:
    return [r["mode"], r["loader"], r["backend"], str(r["world_size"]), str(r["batch_per_gpu"]),
            f"{r['img_s_per_gpu']:,.0f}", f"{r['step_ms']:.1f}", _pct(r["mfu_measured"]), _pct(r["mfu_datasheet"]),
            "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}", f"{r['first_steps_s']:.1f}",
            _pct(r["data_wait_frac"]), f"{r['loss_mean']:.5f}"]


def phase_row(r: dict) -> str:
    return "  ".join(f"{k} {v:.1f}" for k, v in r.get("phases_ms", {}).items())


def print_table(results: list[dict], env: dict) -> None:
    table = Table(title=f"iCT training step on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, "
                        f"bf16 matmul peak {env['measured_bf16_matmul_tflops'] or 0:.0f} TFLOP/s measured)")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("mode", "loader", "backend") else "right")
    for r in results:
        table.add_row(*row(r))
    console = Console(width=200)
    console.print(table)
    for r in results:
        console.print(f"  {r['mode']}/{r['loader']} phases (ms/step): {phase_row(r)}", highlight=False)


def markdown(data: dict) -> str:
    env, lines = data["environment"], []
    lines.append(f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, {env['world_size']} process(es), "
                 f"measured bf16 matmul peak {env['measured_bf16_matmul_tflops'] or 0:.0f} TFLOP/s")
    lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(row(r)) + " |" for r in data["results"]]
    lines.append("")
    lines += [f"- {r['mode']}/{r['loader']}: {phase_row(r)}" for r in data["results"] if r.get("phases_ms")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ict_scale.bench.report",
                                description="Print benchmark result files (python -m ict_scale.bench) as Markdown tables.")
    p.add_argument("paths", nargs="+", metavar="FILE.json")
    for path in p.parse_args(argv).paths:
        with open(path) as f:
            print(f"### {path}\n\n{markdown(json.load(f))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
