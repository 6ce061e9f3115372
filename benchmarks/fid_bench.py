"""Time a one-step FID-50k (generation + Inception features + distance) for the paper networks.

    torchrun --standalone --nproc_per_node=N benchmarks/fid_bench.py [--inception-weights FILE]
    python benchmarks/fid_bench.py --num 64 --tiny --batch-per-rank 16 --iters 1   # a CPU smoke run of the same code

For each recipe (NCSN++ at 32x32 unconditional = CIFAR-10, ADM at 64x64 with 1000 classes = ImageNet-64)
it runs the evaluation stage as training does (bf16 generation by default) after an untimed warm-up,
then measures the generator and Inception-v3 throughput alone. Generator weights are random (speed does
not depend on them); without --inception-weights the Inception weights are random too and the output
says "timing only". Prints a table and writes JSON under benchmarks/results/. Under torchrun write
--num-samples instead of --num (torchrun's own parser claims '--num').
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ict_scale.eval import EvalConfig, FIDEvaluator, RefStats, SampleSpec, build_inception  # noqa: E402
from ict_scale.eval.runtime import sampling_autocast  # noqa: E402
from ict_scale.ict import ConsistencyModel, generate_uint8, sampling_sigmas  # noqa: E402
from ict_scale.networks import build_network, network_c_noise  # noqa: E402
from ict_scale.parallel import comm  # noqa: E402
from ict_scale.parallel.launch_env import device_for  # noqa: E402

# name -> (registry network, resolution, classes, two-step sigma_mid): the paper recipes (iCT §7).
RECIPES = {"cifar10": ("ncsnpp", 32, 0, 0.821), "imagenet64": ("adm", 64, 1000, 1.526)}
TINY = dict(model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())


def join_torchrun() -> torch.device:
    """A benchmark harness joins torchrun itself (as tests do); the library only uses the group."""
    device = device_for(int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)  # bound to this GPU from the start
        else:
            dist.init_process_group("gloo")
    return device


def build_model(recipe: str, tiny: bool, device: torch.device) -> tuple[ConsistencyModel, SampleSpec]:
    name, res, classes, sigma_mid = RECIPES[recipe]
    torch.manual_seed(0)
    net = build_network(name, **(TINY if tiny else {}))
    model = ConsistencyModel(net, network_c_noise(name)).to(device).eval().requires_grad_(False)
    return model, SampleSpec((3, res, res), classes, sigma_mid)


def timing_reference() -> RefStats:
    """Full-rank stand-in statistics: the distance costs the same as against a real reference."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2048, 4096, generator=g, dtype=torch.float64)
    return RefStats(a.mean(1).numpy(), torch.cov(a).numpy(), "timing", "random (timing only)")


def generator_throughput(model, spec: SampleSpec, batch: int, iters: int, autocast) -> float:
    """Images per second of one-step generation alone on this rank (noise already on the device)."""
    device = next(model.parameters()).device
    z = torch.randn((batch, *spec.shape), device=device)
    labels = torch.randint(0, spec.num_classes, (batch,), device=device) if spec.num_classes else None
    sigmas = sampling_sigmas(1, spec.sigma_max, spec.sigma_mid)
    return _throughput(lambda: generate_uint8(model, z, [], labels, sigmas, spec.sigma_min, autocast),
                       batch, iters, device)


def inception_throughput(features, res: int, batch: int, iters: int) -> float:
    """Images per second of Inception alone on this rank (uint8 in, 2048-d fp32 out)."""
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=features.device)
    return _throughput(lambda: features(images), batch, iters, features.device)


def _throughput(fn, batch: int, iters: int, device: torch.device) -> float:
    with torch.no_grad():
        fn()  # warm-up: cuDNN algorithm choice, allocator
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
    return batch * iters / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_recipe(recipe: str, args, features, ref, device) -> dict:
    model, spec = build_model(recipe, args.tiny, device)
    autocast = sampling_autocast(device, args.precision)
    world = comm.get_world_size()
    warm = EvalConfig(num=min(args.num, 2 * world * args.batch_per_rank), steps=[1], batch_per_rank=args.batch_per_rank)
    FIDEvaluator(warm, device, features=features, ref=ref).score(model, spec, autocast)
    cfg = EvalConfig(num=args.num, steps=[1], batch_per_rank=args.batch_per_rank)
    comm.barrier()
    t0 = time.perf_counter()
    result = FIDEvaluator(cfg, device, features=features, ref=ref).score(model, spec, autocast)
    seconds = time.perf_counter() - t0
    gen = comm.all_gather_object(generator_throughput(model, spec, args.batch_per_rank, args.iters, autocast))
    inc = comm.all_gather_object(inception_throughput(features, spec.shape[-1], args.batch_per_rank, args.iters))
    return {"recipe": recipe, "network": RECIPES[recipe][0], "params": sum(p.numel() for p in model.parameters()),
            "resolution": spec.shape[-1], "num": result["num"], "seconds": round(seconds, 3),
            "images_per_s": round(result["num"] / seconds, 1), "distance_s": round(result["seconds_distance"], 3),
            "generator_images_per_s_per_rank": [round(x, 1) for x in gen],
            "inception_images_per_s_per_rank": [round(x, 1) for x in inc],
            "fid_1step": result["fid_1step"]}


def print_table(report: dict) -> None:
    flag = "  [random Inception weights: TIMING ONLY, FID values meaningless]" if report["timing_only"] else ""
    print(f"\nFID-{report['num']} one-step on {report['world_size']} x {report['device']} "
          f"({report['precision']} generation){flag}")
    print(f"{'recipe':<11}{'network':<8}{'params':>12}{'total s':>9}{'img/s':>9}{'dist s':>8}"
          f"{'gen img/s/rank':>16}{'incep img/s/rank':>18}")
    for r in report["results"]:
        gen, inc = r["generator_images_per_s_per_rank"], r["inception_images_per_s_per_rank"]
        print(f"{r['recipe']:<11}{r['network']:<8}{r['params']:>12,}{r['seconds']:>9.1f}{r['images_per_s']:>9.0f}"
              f"{r['distance_s']:>8.2f}{sum(gen) / len(gen):>16.0f}{sum(inc) / len(inc):>18.0f}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    # Under torchrun write --num-samples: torchrun's parser takes '--num' for a prefix of its --numa-binding.
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=50000, help="samples per recipe")
    p.add_argument("--batch-per-rank", type=int, default=256)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="generator arithmetic")
    p.add_argument("--inception-weights", default="", help="the real weights file; omitted: random (timing only)")
    p.add_argument("--iters", type=int, default=10, help="batches timed for the generator and Inception alone")
    p.add_argument("--tiny", action="store_true", help="small generator networks (a CPU smoke run)")
    p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/fid_<device>_<N>x.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = join_torchrun()
    features = build_inception(args.inception_weights, device) if args.inception_weights else \
        build_inception(device=device, random_seed=0)
    ref = timing_reference()
    results = [bench_recipe(r, args, features, ref, device) for r in args.recipes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'x86-64'})"
    report = {"device": name, "world_size": comm.get_world_size(), "precision": args.precision, "num": args.num,
              "batch_per_rank": args.batch_per_rank, "tiny": args.tiny, "torch": torch.__version__,
              "timing_only": not features.protocol["official_weights"], "protocol": features.protocol,
              "results": results}
    if comm.get_rank() == 0:
        print_table(report)
        tag = "cpu" if device.type == "cpu" else name.split()[1].lower() if len(name.split()) > 1 else "gpu"
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"fid_{tag}_{comm.get_world_size()}x{'_tiny' if args.tiny else ''}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out}")
    comm.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
