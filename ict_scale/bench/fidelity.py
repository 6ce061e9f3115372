"""Does the fast path compute the same iCT objective? Two numeric checks of the bf16 / compiled step.

    python -m ict_scale.bench.fidelity [RECIPE] [more.yaml ...] [key=value ...] --out FILE.json

1. Conditioning resolution: the fraction of channels of every block's noise-level projection that differ
   between neighbouring sigmas of the finest discretisation (N = 1281), at its lowest, middle and highest
   interval, with the backend's mixed precision (model.fp32_conditioning on and off).
2. Teacher/student agreement: the student and the teacher pass of `consistency_pair` at EQUAL sigma, with
   the same z and dropout masks, must give the same output; any difference is a numerical offset under
   the loss that eager fp32 training does not have. Measured per precision, compile setting and
   train.teacher_pass, next to the bf16 rounding level of one forward (max |output| * 2^-8).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ict_scale.config import load_config
from ict_scale.ict import P_MEAN, P_STD, SIGMA_MAX, SIGMA_MIN, consistency_pair, karras_sigmas

FINEST_N = 1281
INTERVALS = {"lowest": 0, "middle": (FINEST_N - 1) // 2, "highest": FINEST_N - 2}
BF16_UNIT_ROUNDOFF = 2.0 ** -8


def conditioning_difference(model, net, resolution: int, autocast, device=None) -> dict[str, float]:
    """Fraction of channels, over every block's embedding projection, that differ between sigma_i and sigma_i+1."""
    outputs = []
    hooks = [block.emb_proj.register_forward_hook(lambda m, args, out: outputs.append(out.detach().float()))
             for block in net.shard_units()]
    sigmas = karras_sigmas(FINEST_N)  # the paper's sigma_min, sigma_max and rho
    result = {}
    try:
        for name, i in INTERVALS.items():
            outputs.clear()
            sigma = sigmas[i:i + 2].float().to(device)
            x = torch.randn(1, net.in_channels, resolution, resolution, device=device).expand(2, -1, -1, -1)
            labels = torch.zeros(2, dtype=torch.long, device=device) if net.label_dim else None
            with torch.no_grad(), autocast():
                model(x.contiguous(), sigma, labels)
            differ = sum(int((out[0] != out[1]).sum()) for out in outputs)
            result[name] = differ / sum(out.shape[1] for out in outputs)
    finally:
        for h in hooks:
            h.remove()
    return result


def prepared_backend(configs: list[str], overrides: list[str]):
    """A single-process backend holding the recipe's model, placed and compiled as training would."""
    from ict_scale.parallel.backend import Backend
    from ict_scale.parallel.config import ExecutionConfig
    from ict_scale.train.model import build_model
    cfg = load_config(configs, overrides)
    torch.manual_seed(cfg.train.seed)
    backend = Backend(cfg.parallel, ExecutionConfig.from_train(cfg.train))
    model = build_model(cfg)
    randomize_weights_(model)
    backend.prepare(model, lambda params: torch.optim.SGD(params, lr=0.0))
    return cfg, backend


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module) -> None:
    """Give every layer non-zero random weights, as a trained network has.

    At initialisation the output conv and the last conv of every residual branch are zero, so the network's
    output is 0 and the student and teacher outputs agree trivially; a check of their numerics needs the
    whole network to contribute.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.normal_(module.bias, std=0.05)


def paired_difference(cfg, backend, batch: int, seed: int = 0) -> dict[str, float]:
    """Student minus teacher output at equal sigma (same z, same dropout masks), and the bf16 rounding level."""
    device, res = backend.device, cfg.data.resolution
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(device)
    z = torch.randn(batch, 3, res, res, generator=g).to(device)
    sigma = torch.exp(P_MEAN + P_STD * torch.randn(batch, generator=g)).clamp(SIGMA_MIN, SIGMA_MAX).to(device)
    if cfg.train.channels_last and device.type == "cuda":
        x, z = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, backend.module.net.label_dim, (batch,), generator=g).to(device) \
        if backend.module.net.label_dim else None
    diffs = []
    for repeat in range(3):  # the first calls compile; the later ones are what training runs
        torch.manual_seed(seed + repeat)
        with backend.autocast():
            pred, target = consistency_pair(backend.model, backend.teacher(), x, z, sigma, sigma, labels,
                                            backend.teacher_in_grad_mode())
        diffs.append((pred.detach() - target).abs().float())
    diff = diffs[-1]
    if pred.detach().abs().max() == 0:
        raise ValueError("the network's output is identically zero: nothing to compare")
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "bf16_level": pred.detach().abs().max().item() * BF16_UNIT_ROUNDOFF,
            "max_abs_all_repeats": max(d.max().item() for d in diffs)}


AGREEMENT_MODES = {
    "bf16_eager": ["train.precision=bf16", "train.compile=false"],
    "fp32_eager": ["train.precision=fp32", "train.compile=false"],
    "bf16_compile_no_grad": ["train.precision=bf16", "train.compile=true", "train.teacher_pass=no_grad"],
    "bf16_compile_student_graph": ["train.precision=bf16", "train.compile=true", "train.teacher_pass=student_graph"],
    "fp32_compile_no_grad": ["train.precision=fp32", "train.compile=true", "train.teacher_pass=no_grad"],
    "fp32_compile_student_graph": ["train.precision=fp32", "train.compile=true", "train.teacher_pass=student_graph"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ict_scale.bench.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=["configs/quality/base.yaml"], help="recipe YAMLs, then key=value")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--modes", default=",".join(AGREEMENT_MODES), help="agreement modes to run")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch._dynamo
    configs = [c for c in args.configs if "=" not in c]
    overrides = [c for c in args.configs if "=" in c] + ["train.channels_last=true", "data.source=synthetic"]
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "configs": configs, "overrides": overrides, "batch": args.batch,
           "conditioning": {}, "agreement": {}}
    for name in ("ncsnpp", "adm"):
        for fp32 in (True, False):
            net_overrides = [f"model.name={name}", f"model.fp32_conditioning={str(fp32).lower()}",
                             "train.precision=bf16", "train.compile=false"]
            if name == "adm":
                net_overrides += ["data.resolution=64", "data.num_classes=1000", "data.drop_labels=false"]
            cfg, backend = prepared_backend(["configs/cifar10.yaml"], ["data.source=synthetic", *net_overrides])
            out["conditioning"][f"{name}_fp32_conditioning_{fp32}"] = conditioning_difference(
                backend.teacher(), backend.module.net, cfg.data.resolution, backend.autocast, backend.device)
            print(name, fp32, out["conditioning"][f"{name}_fp32_conditioning_{fp32}"], flush=True)
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        cfg, backend = prepared_backend(configs, [*overrides, *AGREEMENT_MODES[mode]])
        out["agreement"][mode] = paired_difference(cfg, backend, args.batch)
        print(mode, out["agreement"][mode], flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
