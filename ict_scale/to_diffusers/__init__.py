"""A trained model as a diffusers `ConsistencyModelPipeline` folder (UNet + CMStochasticIterativeScheduler).

The scheduler applies the same boundary scalings as ict_scale.ict.precond (c_skip and c_out with the sigma_min
shift, c_in = 1 / sqrt(sigma^2 + sigma_data^2)) and runs the same multistep sampler (CM Algorithm 1, clip to
[-1, 1] before re-noising), so the folder reproduces `python -m ict_scale.sample` from the same noise.
diffusers is an optional dependency: nothing here imports it until an export runs.
"""
from __future__ import annotations

from ict_scale.data.config import label_dim
from ict_scale.errors import UserError

import math
import os

import torch

from ict_scale.networks.adm import ADM
from ict_scale.networks.ncsnpp import NCSNpp

NCSNPP_MODULE = "ict_scale.to_diffusers.ncsnpp_unet"  # what a user imports before loading an NCSN++ export


class DiffusersMissing(UserError, ImportError):
    """The optional diffusers package is not installed."""


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise DiffusersMissing("the diffusers format needs the diffusers package: pip install -e '.[diffusers]' "
                               "(or pip install 'diffusers>=0.30')") from None
    return diffusers


def scheduler_config(cfg) -> dict:
    """CMStochasticIterativeScheduler's arguments for the recipe: its sigmas, sigma_data and rho, and the
    boundaries of the curriculum's final discretisation, N(K) = s1 + 1, as the Karras grid of `timesteps`."""
    i = cfg.ict
    return dict(num_train_timesteps=int(i.s1) + 1, sigma_min=float(i.sigma_min), sigma_max=float(i.sigma_max),
                sigma_data=float(i.sigma_data), s_noise=1.0, rho=float(i.rho), clip_denoised=True)


def karras_sigma(index: int, sched: dict) -> float:
    """The scheduler's sigma for grid index `index` (its ramp index / (N - 1), Karras et al. eq. 5)."""
    lo, hi = sched["sigma_min"] ** (1 / sched["rho"]), sched["sigma_max"] ** (1 / sched["rho"])
    return (hi + index / (sched["num_train_timesteps"] - 1) * (lo - hi)) ** sched["rho"]


def two_step_timesteps(cfg) -> tuple[list[int], float]:
    """`timesteps` for the pipeline's two-step sampler: [j, 0], with grid sigma_j nearest the recipe's sigma_mid.

    The scheduler takes integer grid indices only, so sigma_j is within half a grid step of eval.sigma_mid
    (the returned value; pass it as --sigma-mid to `python -m ict_scale.sample` for the identical sampler).
    """
    sched = scheduler_config(cfg)
    j = min(range(1, sched["num_train_timesteps"]),
            key=lambda k: abs(math.log(karras_sigma(k, sched)) - math.log(cfg.eval.sigma_mid)))
    return [j, 0], karras_sigma(j, sched)


def to_diffusers_unet(model, network_args: dict):
    """The diffusers model for the backbone of a ConsistencyModel, carrying its (EMA) weights."""
    net = model.net
    if isinstance(net, ADM):
        from .adm import to_unet2d
        return to_unet2d(net)
    if isinstance(net, NCSNpp):
        from .ncsnpp_unet import NCSNppUNet
        unet = NCSNppUNet.from_network_args(network_args)
        unet.net.load_state_dict(net.state_dict(), strict=True)
        return unet.eval()
    raise ValueError(f"no diffusers form for a {type(net).__name__} backbone (expected ADM or NCSNpp)")


@torch.no_grad()
def check_same_function(model, unet, scheduler, label_dim: int, probes: int = 2) -> float:
    """Largest |difference| between the exported UNet inside the scheduler's scalings and the model, at sigma_max
    and one smaller sigma on random inputs; the export refuses a mismatch beyond float rounding."""
    res, ch = unet.config.sample_size, unet.config.in_channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn((probes, ch, res, res), generator=g)
    labels = torch.randint(0, label_dim, (probes,), generator=g) if label_dim else None
    worst = 0.0
    for sigma in (scheduler.config.sigma_max, 1.0):
        s = torch.full((probes,), sigma)
        ours = model(x * sigma, s, labels)
        t = 1000 * 0.25 * math.log(sigma + 1e-44)
        sd = scheduler.config.sigma_data
        F_x = unet(x * sigma / math.sqrt(sigma ** 2 + sd ** 2), torch.tensor(t), class_labels=labels).sample
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition(s[0])
        worst = max(worst, float((c_skip * x * sigma + c_out * F_x - ours).abs().max()))
    return worst


def model_card(cfg, name: str, checkpoint: str, timesteps: list[int], sigma_j: float, is_ncsnpp: bool) -> str:
    """README.md of the folder: what it is and the lines that sample from it."""
    labels = "class_labels=[0, 1, 2, 3], " if label_dim(cfg.data) else ""
    res, step_name = cfg.data.resolution, checkpoint.rstrip("/").rpartition("/")[2]
    lines = [f"# {cfg.model.name} consistency model (iCT, trained with ict_scale)", "",
             f"EMA weights of `{step_name}`; {res}x{res} images.", "", "```python",
             *([f"import {NCSNPP_MODULE}  # NCSN++ is a model class of ict_scale"] if is_ncsnpp else []),
             "from diffusers import ConsistencyModelPipeline",
             f'pipe = ConsistencyModelPipeline.from_pretrained("{name}")',
             f"images = pipe({labels}batch_size=4, num_inference_steps=1).images  # one step from sigma_max",
             f"images = pipe({labels}batch_size=4, timesteps={timesteps}).images  # two steps, via {sigma_j:.4f}",
             "```", "",
             f"The recipe's two-step level is {cfg.eval.sigma_mid}; the scheduler's grid point nearest it is "
             f"{sigma_j:.6f} (`python -m ict_scale.sample ... --steps 2 --sigma-mid {sigma_j!r}` is the same sampler)."]
    return "\n".join(lines) + "\n"


def export_pipeline(model, cfg, network_args: dict, out_dir: str, checkpoint: str) -> dict:
    """Write the ConsistencyModelPipeline folder `out_dir`; return what a caller prints (timesteps, sigma, error)."""
    require_diffusers()
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline
    unet = to_diffusers_unet(model, network_args)
    scheduler = CMStochasticIterativeScheduler(**scheduler_config(cfg))
    error = check_same_function(model, unet, scheduler, network_args["label_dim"])
    if not error <= 1e-3:
        raise RuntimeError(f"the diffusers model does not reproduce the network (max |difference| {error:.3g})")
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    timesteps, sigma_j = two_step_timesteps(cfg)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(cfg, os.path.basename(os.path.abspath(out_dir)), checkpoint, timesteps, sigma_j,
                           isinstance(model.net, NCSNpp)))
    return {"timesteps": timesteps, "sigma_mid": sigma_j, "max_difference": error}
