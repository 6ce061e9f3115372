"""GPU checks of the parallel layer on one host with 4 GPUs (NCCL, bf16), results as JSON + markdown.

    python benchmarks/scale_gpu.py --out DIR [--work DIR] [--budget-s 480] [--phases equivalence,resume,two_node,throughput]

equivalence  single GPU (4 micro-batches) vs DDP / FSDP2 / ZeRO-2 / ZeRO-3 on 2 and 4 GPUs: per-step
             loss, and the EMA after 8 steps relative to how far it moved in the last 4 steps
resume       4 -> 2 GPUs: FSDP2 (DCP resharding) and ZeRO-3 (universal conversion) continue the 4-GPU run
two_node     two torchrun agents x 2 GPUs meeting through c10d rendezvous on localhost; FSDP2 as HSDP
             (shard inside an "agent", replicate across the two)
throughput   images/s of the CIFAR-10 NCSN++ (56M parameters, batch 128 per GPU) on 4 GPUs per backend

Every run goes through `python -m ict_scale.train` (torchrun or the launcher scripts). Phases that
would not fit in the remaining budget are skipped and reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SMALL = [  # 2.3M parameters at 32x32: real kernels, seconds per run
    "data.source=synthetic", "data.resolution=32", "data.num_workers=0", "data.num_classes=10",
    "model.name=ncsnpp", "model.model_channels=64", "model.channel_mult=[1,2,2]", "model.num_blocks=1",
    "model.attn_resolutions=[16]", "train.batch_size=64", "train.batch_per_gpu=16", "train.total_steps=8",
    "train.ckpt_every=4", "train.ema_decay=0.9", "train.log_every=1", "train.grid_every=0", "train.grid_num=16",
    "train.precision=bf16", "eval.sigma_mid=0.821", "optim.lr=1e-3", "optim.eps=1e-4",
]
BACKENDS = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp": ["parallel.backend=fsdp"],
    "zero2": ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.yaml"],
    "zero3": ["parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero3.yaml"],
}
# bf16 compute: backends differ by rounding (bf16 all-gathers, DeepSpeed's bf16 weights), not by math.
LOSS_RTOL = 0.03
EMA_REL = 0.1


def env_for(gpus: str, **extra) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4",
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(nproc: int, gpus: str, overrides: list[str], log: str) -> subprocess.Popen:
    if nproc == 1:
        cmd = [sys.executable, "-m", "ict_scale.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "ict_scale.train", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env_for(gpus), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, str], timeout_s: float) -> dict[str, int]:
    deadline, codes = time.monotonic() + timeout_s, {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = -9
        if codes[name] != 0:
            with open(logs[name]) as f:
                print(f"--- {name} exited {codes[name]}:\n{f.read()[-2500:]}", flush=True)
    return codes


def metrics(run_dir: str) -> dict[int, dict]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def ema(run_dir: str, step: int) -> dict[str, torch.Tensor]:
    from ict_scale.config import load_config
    from ict_scale.parallel import dcp_io
    from ict_scale.train.model import build_model
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{step:09d}")
    model = build_model(load_config([os.path.join(ckpt, "config.yaml")], []))
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    dcp_io.load_ema(ckpt, out)
    return out


def compare(run_dir: str, ref_dir: str, steps) -> dict:
    """Loss per step and the step-8 EMA against the reference run."""
    got, want = metrics(run_dir), metrics(ref_dir)
    loss_rel = max(abs(got[s]["loss"] - want[s]["loss"]) / abs(want[s]["loss"]) for s in steps)
    a, b, b4 = ema(run_dir, 8), ema(ref_dir, 8), ema(ref_dir, 4)
    diff = sum((a[n] - b[n]).pow(2).sum() for n in a).sqrt()
    moved = sum((b[n] - b4[n]).pow(2).sum() for n in b).sqrt()
    rel = float(diff / moved)
    return {"loss_max_rel_diff": loss_rel, "ema_rel_diff": rel, "ok": loss_rel < LOSS_RTOL and rel < EMA_REL,
            "img_per_s_last": got[max(steps)].get("img_per_s")}


# Waves of runs on disjoint GPUs: (name, world size, GPUs); a wave's runs go at the same time.
WAVES = [[("single", 1, "3"), ("ddp_x2", 2, "0,1")], [("fsdp_x2", 2, "0,1"), ("zero2_x2", 2, "2,3")],
         [("zero3_x2", 2, "0,1")], [("ddp_x4", 4, "0,1,2,3")], [("fsdp_x4", 4, "0,1,2,3")],
         [("zero2_x4", 4, "0,1,2,3")], [("zero3_x4", 4, "0,1,2,3")]]


def pack(runs: list[tuple[str, int, str]]) -> list[list[tuple[str, int, str]]]:
    """Runs in order, each in the first wave (after the last one holding a run it follows) with free GPUs."""
    waves: list[list] = []
    for run in runs:
        gpus = set(run[2].split(","))
        if waves and not gpus & {g for r in waves[-1] for g in r[2].split(",")}:
            waves[-1].append(run)
        else:
            waves.append([run])
    return waves


def phase_equivalence(root: str, results: dict, budget, extra: list[str], select: set[str]) -> None:
    ref, codes = os.path.join(root, "single"), {}
    runs = [r for wave in WAVES for r in wave if not select or r[0] in select]
    for wave in pack(runs):
        if not budget(60):
            results["equivalence"].setdefault("skipped", []).extend(name for name, _, _ in wave)
            continue
        procs, logs = {}, {}
        for name, world, gpus in wave:
            backend = BACKENDS.get(name.split("_")[0], ["parallel.backend=single"])
            logs[name] = os.path.join(root, f"{name}.log")
            procs[name] = start(world, gpus, [*SMALL, *backend, f"train.run_dir={root}/{name}", *extra], logs[name])
        codes.update(wait_all(procs, logs, timeout_s=240))
    for name, code in codes.items():
        rec = {"exit": code}
        if name != "single" and code == 0 and codes.get("single") == 0:
            rec.update(compare(os.path.join(root, name), ref, range(1, 9)))
        results["equivalence"][name] = rec
        print(name, rec, flush=True)


def phase_resume(root: str, results: dict, budget, extra: list[str], select: set[str]) -> None:
    """Resume the 4-GPU FSDP2 and ZeRO-3 runs from step 4 on 2 GPUs; compare with their own 4-GPU steps 5-8."""
    procs, logs, dirs = {}, {}, {}
    for name, gpus in (("fsdp", "0,1"), ("zero3", "2,3")):
        if select and f"{name}_4to2" not in select:
            continue
        src = os.path.join(root, f"{name}_x4")
        if not os.path.exists(os.path.join(src, "checkpoints", f"step_{4:09d}", "COMMIT")) or not budget(60):
            results["resume"][name] = {"skipped": True}
            continue
        dst = dirs[name] = os.path.join(root, f"{name}_4to2")
        shutil.copytree(os.path.join(src, "checkpoints", f"step_{4:09d}"),
                        os.path.join(dst, "checkpoints", f"step_{4:09d}"))
        logs[name] = os.path.join(root, f"{name}_4to2.log")
        procs[name] = start(2, gpus, [*SMALL, *BACKENDS[name], f"train.run_dir={dst}", *extra], logs[name])
    codes = wait_all(procs, logs, timeout_s=240)
    for name in procs:
        rec = {"exit": codes[name]}
        if codes[name] == 0:
            rec.update(compare(dirs[name], os.path.join(root, f"{name}_x4"), range(5, 9)))
            rec["resumed_at"] = min(metrics(dirs[name]))
            rec["ok"] = rec["ok"] and rec["resumed_at"] == 5
        results["resume"][name] = rec
        print("resume", name, rec, flush=True)


def phase_two_node(root: str, results: dict, budget, extra: list[str], select: set[str]) -> None:
    if not budget(60):
        results["two_node"] = {"skipped": True}
        return
    run_dir = os.path.join(root, "hsdp_2x2")
    cmd = ["bash", "launchers/torchrun.sh", *SMALL, "parallel.backend=fsdp", "parallel.fsdp_shard_size=2",
           f"train.run_dir={run_dir}", *extra]
    procs, logs = {}, {}
    for agent, gpus in enumerate(("0,1", "2,3")):
        logs[agent] = os.path.join(root, f"hsdp_agent{agent}.log")
        env = env_for(gpus, NNODES=2, NPROC_PER_NODE=2, RDZV_ENDPOINT="127.0.0.1:29477", RDZV_ID="bench",
                      MAX_RESTARTS=0, PYTHON=sys.executable)
        procs[agent] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(logs[agent], "w"), stderr=subprocess.STDOUT)
    codes = wait_all(procs, logs, timeout_s=240)
    rec = {"exit": list(codes.values())}
    if all(c == 0 for c in codes.values()) and os.path.exists(os.path.join(root, "single", "metrics.jsonl")):
        rec.update(compare(run_dir, os.path.join(root, "single"), range(1, 9)))
    results["two_node"] = rec
    print("two_node", rec, flush=True)


def phase_throughput(root: str, results: dict, budget, extra: list[str], select: set[str]) -> None:
    """CIFAR-10 NCSN++ at its recipe size, 128 images per GPU, 4 GPUs; img/s over steps 11-20."""
    recipe = ["data.source=synthetic", "data.resolution=32", "data.num_workers=0", "data.num_classes=0",
              "model.name=ncsnpp", "train.batch_size=512", "train.batch_per_gpu=128", "train.total_steps=20",
              "train.ckpt_every=100000", "train.log_every=10", "train.grid_every=0", "train.grid_num=16",
              "train.precision=bf16", "eval.sigma_mid=0.821"]
    for name, backend in BACKENDS.items():
        if select and f"tp_{name}" not in select:
            continue
        if not budget(75):
            results["throughput"][name] = {"skipped": True}
            continue
        run_dir = os.path.join(root, f"tp_{name}")
        log = os.path.join(root, f"tp_{name}.log")
        codes = wait_all({name: start(4, "0,1,2,3", [*recipe, *backend, f"train.run_dir={run_dir}", *extra], log)},
                         {name: log}, timeout_s=240)
        rec = {"exit": codes[name]}
        if codes[name] == 0:
            m = metrics(run_dir)
            rec.update({"img_per_s_steps_1_10": m[10]["img_per_s"], "img_per_s_steps_11_20": m[20]["img_per_s"]})
        results["throughput"][name] = rec
        print("throughput", name, rec, flush=True)


def markdown(results: dict) -> str:
    lines = [f"# Parallel layer on {results['device']} (torch {results['torch']}, {results['date']})", "",
             "| check | exit | loss max rel diff | EMA rel diff | ok |", "|---|---|---|---|---|"]
    for phase in ("equivalence", "resume"):
        for name, r in results[phase].items():
            if isinstance(r, dict) and "loss_max_rel_diff" in r:
                lines.append(f"| {phase} {name} | {r['exit']} | {r['loss_max_rel_diff']:.2e} | "
                             f"{r['ema_rel_diff']:.2e} | {r['ok']} |")
            elif isinstance(r, dict):
                lines.append(f"| {phase} {name} | {r.get('exit', 'skipped')} | | | |")
    r = results.get("two_node", {})
    if "loss_max_rel_diff" in r:
        lines.append(f"| two agents x 2 GPUs, HSDP | {r['exit']} | {r['loss_max_rel_diff']:.2e} | "
                     f"{r['ema_rel_diff']:.2e} | {r['ok']} |")
    lines += ["", "Throughput, NCSN++ CIFAR-10 (56M), batch 128/GPU, 4 GPUs, bf16:", "",
              "| backend | img/s (steps 1-10, with warm-up) | img/s (steps 11-20) |", "|---|---|---|"]
    for name, r in results["throughput"].items():
        if "img_per_s_steps_11_20" in r:
            lines.append(f"| {name} | {r['img_per_s_steps_1_10']:.0f} | {r['img_per_s_steps_11_20']:.0f} |")
    errors = [f"- {name}: {r['error']}" for name, r in results.items() if isinstance(r, dict) and "error" in r]
    lines += ["", "Errors:", *errors] if errors else []
    lines += ["", f"Tolerances: loss rel < {LOSS_RTOL}, EMA rel < {EMA_REL} (EMA distance to the single-GPU "
              "reference at step 8, divided by how far the reference EMA moved from step 4 to 8)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where scale_gpu.json and scale_gpu.md go")
    p.add_argument("--work", default="", help="run directories (checkpoints); default OUT/runs")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--phases", default="equivalence,resume,two_node,throughput")
    p.add_argument("--select", default="", help="only these runs, e.g. single,zero2_x2,zero3_4to2,tp_ddp")
    p.add_argument("--extra", nargs="*", default=[], help="overrides appended to every run (e.g. a CPU smoke run)")
    args = p.parse_args()
    t0 = time.monotonic()

    def budget(need_s: float) -> bool:
        return time.monotonic() - t0 + need_s < args.budget_s

    root = args.work or os.path.join(args.out, "runs")
    os.makedirs(root, exist_ok=True)
    device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"
    results = {"device": device, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "equivalence": {}, "resume": {}, "throughput": {}}
    phases = {"equivalence": phase_equivalence, "resume": phase_resume, "two_node": phase_two_node,
              "throughput": phase_throughput}
    for name in args.phases.split(","):
        print(f"[{time.monotonic() - t0:.0f}s] phase {name}", flush=True)
        try:
            phases[name](root, results, budget, args.extra, set(filter(None, args.select.split(","))))
        except Exception as e:  # one broken phase must not cost the others' device time
            results[name] = {**results.get(name, {}), "error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"phase {name} failed: {e!r}", flush=True)
        with open(os.path.join(args.out, "scale_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)
    results["seconds"] = time.monotonic() - t0
    with open(os.path.join(args.out, "scale_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "scale_gpu.md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
