"""`python -m ict_scale.bench [RECIPE] [more.yaml ...] [key=value ...] [--modes ...] [--loaders ...]`

Times the real iCT training step of a recipe (network, loss, RAdam, EMA, the loop's host sync) for each
mode (a named set of config overrides) and data source, in one process, and writes one JSON file with
img/s per GPU, MFU against the bf16 matrix-product peak measured in the same process and against the
datasheet, peak memory, a per-phase breakdown, and the mean loss over every step run (the same weights
and batches in every mode, so a mode that changes the numerics beyond bf16 noise shows). Under torchrun it measures the
configured parallel backend on every rank; rank 0 writes. Examples:

    python -m ict_scale.bench cifar10 --modes fp32_eager,bf16_cl,bf16_cl_compile --batch-per-gpu 256
    torchrun --standalone --nproc_per_node=4 -m ict_scale.bench cifar10 configs/parallel/fsdp.yaml --modes bf16_cl
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys

import torch

from ict_scale.checkpoint.storage import write_whole
from ict_scale.config import ConfigError
from ict_scale.parallel import comm
from ict_scale.train.__main__ import find_config
from ict_scale.urls import url_to_fs

from .measure import MODES, Bench, matmul_peak_tflops, parse_mode
from .report import print_table


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ict_scale.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="cifar10", help="recipe name or YAML (default: cifar10)")
    p.add_argument("overrides", nargs="*", help="more YAML files, then key=value overrides")
    p.add_argument("--modes", default="fp32_eager,bf16_cl,bf16_cl_compile",
                   help=f"comma-separated presets: {', '.join(MODES)}")
    p.add_argument("--mode", action="append", default=[], metavar="'NAME:key=value ...'",
                   help="a further mode: a preset or a new name plus space-separated overrides (repeatable)")
    p.add_argument("--loaders", default="device", help="device (batches made on the GPU) and/or real (the loader)")
    p.add_argument("--batch-per-gpu", type=int, default=0, help="override train.batch_per_gpu (0 = the recipe's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--profile", action="store_true", help="also break 3 steps' GPU kernel time down by kind")
    p.add_argument("--out", default="", help="JSON file to write (default benchmarks/results/train_<card>_<n>x_<recipe>.json)")
    args = p.parse_args(argv)
    args.configs = [args.config, *(o for o in args.overrides if "=" not in o)]
    args.overrides = [o for o in args.overrides if "=" in o]
    if args.batch_per_gpu:
        args.overrides.append(f"train.batch_per_gpu={args.batch_per_gpu}")
    args.modes = [parse_mode(m) for m in [*args.modes.split(","), *args.mode] if m]
    args.loaders = [name for name in args.loaders.split(",") if name]
    unknown = sorted(set(args.loaders) - {"device", "real"})
    if unknown:
        p.error(f"--loaders: unknown {unknown}; expected device and/or real")
    return args


def environment(device: torch.device, peak: float | None) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "measured_bf16_matmul_tflops": peak, "world_size": comm.get_world_size()}


def default_out(env: dict, recipe: str) -> str:
    card = env["device"].replace("NVIDIA ", "").split()[0].lower() if env["device"] else "cpu"
    name = os.path.splitext(os.path.basename(recipe))[0]
    return os.path.join("benchmarks", "results", f"train_{card}_{env['world_size']}x_{name}.json")


def release_memory() -> None:
    """Drop the finished mode's model, compiled graphs and cached blocks before the next mode builds its own."""
    import torch._dynamo
    torch._dynamo.reset()  # compiled graphs hold their modules; the on-disk Inductor cache survives this
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        configs = [find_config(c) for c in args.configs]
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bench, results, env, out = Bench(configs, args.overrides), [], None, None
    for loader in args.loaders:
        for name, overrides in args.modes:
            result = bench.measure(name, overrides, loader, args.steps, args.warmup, profile=args.profile)
            if env is None:  # the first mode has set up the device and process group
                bench.peak = matmul_peak_tflops(bench.backend.device)
                env = environment(bench.backend.device, bench.peak)
                result = dataclasses.replace(result, mfu_measured=result.tflops_per_gpu / bench.peak
                                             if bench.peak else None)
            results.append(dataclasses.asdict(result))
            if bench.backend.rank == 0:  # written after every mode: a run cut short keeps what it measured
                print_table(results, env)
                out = args.out or default_out(env, configs[0])
                write_whole(*url_to_fs(out),
                            (json.dumps({"environment": env, "results": results}, indent=1) + "\n").encode())
            release_memory()
    if out:
        print(f"wrote {out}")
    comm.destroy()  # leave the process group the first mode's backend joined
    return 0


if __name__ == "__main__":
    sys.exit(main())
