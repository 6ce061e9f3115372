"""`python -m ict_scale.export --format diffusers`: the folder that diffusers' ConsistencyModelPipeline loads
computes what ict_scale computes, network by network and sample by sample (offline, tiny networks, CPU)."""
import math
import os

import numpy as np
import pytest

from ict_scale.errors import UserError
import torch

# Offline before huggingface_hub is imported (it reads the variable once): every file comes from the export.
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("diffusers")  # an optional extra; `make test` installs it, so there these tests run

from diffusers import ConsistencyModelPipeline, UNet2DModel  # noqa: E402

from ict_scale import export, sample  # noqa: E402
from ict_scale.config import load_config  # noqa: E402
from ict_scale.data.config import label_dim  # noqa: E402
from ict_scale.ict import multistep_sample  # noqa: E402
from ict_scale.networks import build_network, network_c_noise, network_kwargs  # noqa: E402
from ict_scale.to_diffusers import karras_sigma, scheduler_config, two_step_timesteps  # noqa: E402
from ict_scale.to_diffusers.adm import NotExpressible, to_unet2d  # noqa: E402
from ict_scale.to_diffusers.ncsnpp_unet import NCSNppUNet  # noqa: E402
from ict_scale.checkpoint.load import load_ema_model  # noqa: E402
from ict_scale.train.grids import grid_png  # noqa: E402
from ict_scale.train.loop import train  # noqa: E402
from ict_scale.train.model import build_model  # noqa: E402

SMALL = {
    "adm": dict(img_resolution=16, in_channels=3, label_dim=5, model_channels=32, channel_mult=(1, 2, 2),
                num_blocks=1, attn_resolutions=(8, 4), head_channels=32, dropout=0.0),
    # 64 channels: with 32 or fewer, GroupNorm(32) holds one channel per group and erases the additive noise
    # embedding, so a wrong c_noise would go unseen; Fourier scale 16 (score-SDE's) makes c_noise's digits count.
    "ncsnpp": dict(img_resolution=16, in_channels=3, label_dim=0, model_channels=32, channel_mult=(2, 2),
                   num_blocks=1, attn_resolutions=(8,), dropout=0.0, fourier_scale=16.0),
}
SIGMAS = torch.tensor([80.0, 11.3, 0.821, 0.05, 0.002])


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter: the zero-initialised output convs would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def inputs(net_kwargs, batch=len(SIGMAS)):
    g = torch.Generator().manual_seed(1)
    res = net_kwargs["img_resolution"]
    x = torch.randn((batch, 3, res, res), generator=g)
    labels = torch.randint(0, net_kwargs["label_dim"], (batch,), generator=g) if net_kwargs["label_dim"] else None
    return x, labels


def scheduler_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """What CMStochasticIterativeScheduler hands the UNet: 1000 * 0.25 ln(sigma + 1e-44), in float64."""
    return 1000 * 0.25 * torch.log(sigma.double() + 1e-44)


@torch.no_grad()
def test_adm_maps_onto_unet2dmodel_exactly():
    net = build_network("adm", **SMALL["adm"]).eval()
    randomise_(net)
    unet = to_unet2d(net)
    assert isinstance(unet, UNet2DModel)
    assert list(unet.config.down_block_types) == ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
    x, labels = inputs(SMALL["adm"])
    c_noise = network_c_noise("adm")(SIGMAS)  # ADM's c_noise is the scheduler's timestep itself
    ours = net(x, c_noise, labels)
    assert ours.abs().mean() > 0.1  # a real function of the inputs, not the zero output of a fresh network
    torch.testing.assert_close(unet(x, c_noise, class_labels=labels).sample, ours, rtol=1e-5, atol=1e-5)
    # The scheduler computes it in float64: the same function up to float32 rounding of the timestep.
    theirs = unet(x, scheduler_timestep(SIGMAS), class_labels=labels).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_adm_that_unet2dmodel_cannot_express_is_refused():
    net = build_network("adm", **{**SMALL["adm"], "channel_mult": (2, 2, 2)})
    with pytest.raises(NotExpressible, match="channel_mult\\[0\\] must be 1"):
        to_unet2d(net)


@torch.no_grad()
def test_ncsnpp_diffusers_model_equals_the_network():
    net = build_network("ncsnpp", **SMALL["ncsnpp"]).eval()
    randomise_(net)
    unet = NCSNppUNet.from_network_args(network_kwargs("ncsnpp", **SMALL["ncsnpp"])).eval()
    unet.net.load_state_dict(net.state_dict())
    x, _ = inputs(SMALL["ncsnpp"])
    ours = net(x, network_c_noise("ncsnpp")(SIGMAS), None)
    theirs = unet(x, scheduler_timestep(SIGMAS)).sample
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def tiny_cfg(name, run_dir="unused"):
    labels = ["data.drop_labels=false"] if name == "adm" else ["data.drop_labels=true"]
    return load_config([], [f"model.name={name}", "model.model_channels=32", "model.channel_mult=[1,2]",
                            "model.num_blocks=1", "model.attn_resolutions=[4]", "model.dropout=0",
                            "data.resolution=8", "data.num_classes=4", "data.num_workers=0", "ict.s1=40",
                            "train.total_steps=2", "train.batch_size=4", "train.batch_per_gpu=4",
                            "train.grid_every=0", "train.grid_num=4", f"train.run_dir={run_dir}", *labels])


def exported_random_model(name, tmp_path):
    """A model with random weights, written the way `python -m ict_scale.export` writes one."""
    cfg = tiny_cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    randomise_(model)
    path = str(tmp_path / "model.safetensors")
    export.write_safetensors(model, cfg, "random", path)
    return path, cfg


def pipeline_samples(pipe, num, res, seed, num_classes, steps, timesteps=None):
    """The pipeline's samples as NHWC floats in [0, 1], from the noise and labels `python -m ict_scale.sample
    --seed` draws: z, then the re-noise (the scheduler's own draw from the same generator), then the labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((num, 3, res, res), generator=g)
    draws = torch.Generator().manual_seed(seed)
    torch.randn((num, 3, res, res), generator=draws), torch.randn((num, 3, res, res), generator=draws)
    labels = torch.randint(0, num_classes, (num,), generator=draws) if num_classes else None
    out = pipe(batch_size=num, class_labels=labels, latents=z, generator=g, output_type="np",
               **({"timesteps": timesteps} if timesteps else {"num_inference_steps": steps})).images
    return out


@torch.no_grad()
def ict_scale_floats(path, num, res, seed, num_classes, sigmas):
    """What `python -m ict_scale.sample` computes before rounding to uint8, as NHWC floats in [0, 1]."""
    model, cfg, _ = load_ema_model(path)
    g = torch.Generator().manual_seed(seed)
    z, renoise = torch.randn((num, 3, res, res), generator=g), torch.randn((num, 3, res, res), generator=g)
    labels = torch.randint(0, num_classes, (num,), generator=g) if num_classes else None
    x = multistep_sample(model, z, sigmas, labels, [renoise][:len(sigmas) - 1], cfg.ict.sigma_min)
    return (x / 2 + 0.5).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", ["adm", "ncsnpp"])
def test_pipeline_samples_equal_ict_scale_sample(name, tmp_path):
    path, cfg = exported_random_model(name, tmp_path)
    folder = str(tmp_path / "hf")
    assert export.main([path, "--format", "diffusers", "--out", folder]) == 0
    if name == "ncsnpp":
        assert "ict_scale.to_diffusers.ncsnpp_unet" in open(os.path.join(folder, "model_index.json")).read()
    timesteps, sigma_j = two_step_timesteps(cfg)
    num, res = 6, cfg.data.resolution
    num_classes = label_dim(cfg.data)
    pipe = ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for steps in (1, 2):
        out = str(tmp_path / f"s{steps}")
        sample.main([path, "--steps", str(steps), "--num", str(num), "--out", out, "--seed", "3",
                     "--sigma-mid", repr(sigma_j)])
        ours = np.load(out + ".npz")["arr_0"]
        theirs = pipeline_samples(pipe, num, res, 3, num_classes, steps, timesteps if steps == 2 else None)
        # The floats: ict_scale's sampler on the same model, noise and labels, in diffusers' [0, 1] range.
        ours_float = ict_scale_floats(path, num, res, 3, num_classes, [cfg.ict.sigma_max, sigma_j][:steps])
        np.testing.assert_allclose(theirs, ours_float, rtol=0, atol=2e-6)
        # The written pixels: ict_scale rounds (x + 1) * 127.5, so each is within half a level of diffusers' float.
        assert np.abs(theirs * 255 - ours.astype(np.float64)).max() <= 0.5 + 1e-3
        if steps == 2:
            assert np.abs(ours.astype(int) - one_step.astype(int)).mean() > 1  # the second step did change them
        one_step = ours


def test_two_step_timesteps_land_on_the_recipe_level():
    cfg = load_config([], ["eval.sigma_mid=0.821"])  # recipe defaults: s1 = 1280, the scheduler's grid has 1281
    (j, zero), sigma_j = two_step_timesteps(cfg)
    assert zero == 0 and scheduler_config(cfg)["num_train_timesteps"] == 1281
    assert abs(math.log(sigma_j / 0.821)) < 0.005 and sigma_j == karras_sigma(j, scheduler_config(cfg))


def test_export_refuses_without_diffusers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # what `import diffusers` sees uninstalled
    with pytest.raises(UserError, match=r"pip install -e '\.\[diffusers\]'"):
        export.main([str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_demo_run_exports_and_draws_a_grid_through_the_pipeline(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config([os.path.join(repo, "configs", "demo.yaml")],
                      [f"train.run_dir={tmp_path / 'run'}", "train.total_steps=2", "train.batch_size=4",
                       "train.batch_per_gpu=4", "train.grid_num=4"])
    train(cfg)
    folder = str(tmp_path / "hf")
    assert export.main([str(tmp_path / "run"), "--format", "diffusers", "--out", folder]) == 0
    assert "from_pretrained(\"hf\")" in open(os.path.join(folder, "README.md")).read()
    pipe = ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 4 and images[0].size == (16, 16)
    grid = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    png = grid_png(grid, upscale=8)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
