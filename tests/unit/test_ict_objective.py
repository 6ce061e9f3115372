"""The objective: per-sample pseudo-Huber, parameterisation boundary condition, teacher/student pass, and
ICTLoss, which composes them with the curriculum."""
import contextlib
import dataclasses
import math

import pytest
import torch
from torch import nn

from ict_scale.config import load_config
from ict_scale.config.schema import ICTConfig
from ict_scale.ict import (METRICS, ConsistencyModel, Discretisation, ICTLoss, boundary_scalings, consistency_pair,
                           num_scales_at, num_scales_sqrt_at, pseudo_huber, pseudo_huber_c, sample_intervals)
from ict_scale.parallel.backend import Backend
from ict_scale.parallel.config import ExecutionConfig
from ict_scale.train.run import make_optimizer
from ict_scale.train.step import micro_batch_seed, train_step


def test_pseudo_huber_check_value_and_constant():
    a = torch.full((1, 3, 32, 32), 0.01)
    assert pseudo_huber_c((3, 32, 32)) == pytest.approx(0.02993, abs=5e-6)
    assert pseudo_huber_c((3, 64, 64)) == pytest.approx(0.05986, abs=5e-6)
    assert pseudo_huber(a, torch.zeros_like(a)).item() == pytest.approx(0.52513394, rel=1e-6)


def test_pseudo_huber_is_per_sample_not_elementwise():
    a = torch.randn(4, 3, 8, 8)
    b = torch.randn(4, 3, 8, 8)
    d = pseudo_huber(a, b)
    assert d.shape == (4,)
    c = pseudo_huber_c((3, 8, 8))
    for i in range(4):
        expected = math.sqrt(((a[i] - b[i]) ** 2).sum().item() + c * c) - c
        assert d[i].item() == pytest.approx(expected, rel=1e-5)
    elementwise = (torch.sqrt((a - b) ** 2 + c * c) - c).flatten(1).sum(1)
    assert not torch.allclose(d, elementwise)


def test_boundary_scalings_check_values():
    for sigma, expected in ((0.5, (0.50200400, 0.35213918, 1.41421356)),
                            (80.0, (3.9062927e-05, 0.49997774, 0.012499756))):
        got = boundary_scalings(torch.tensor(sigma, dtype=torch.float64))
        for g, e in zip(got, expected):
            assert g.item() == pytest.approx(e, rel=1e-7)


class Tiny(nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(p)
        self.seen = []

    def forward(self, x, noise_labels, class_labels=None):
        self.seen.append(noise_labels.detach().clone())
        return self.drop(self.conv(x) + noise_labels.view(-1, 1, 1, 1))


def test_boundary_condition_is_exact():
    model = ConsistencyModel(Tiny(), lambda s: 0.25 * torch.log(s))
    x = torch.randn(5, 3, 8, 8)
    out = model(x, torch.full((5,), 0.002))
    assert torch.equal(out, x)


def test_c_noise_reaches_the_backbone():
    net = Tiny()
    model = ConsistencyModel(net, lambda s: 0.25 * torch.log(s)).eval()
    model(torch.randn(2, 3, 4, 4), torch.tensor([0.5, 80.0]))
    assert torch.allclose(net.seen[-1], 0.25 * torch.log(torch.tensor([0.5, 80.0])))


def test_teacher_pass_creates_no_gradient_and_masks_match():
    torch.manual_seed(0)
    model = ConsistencyModel(Tiny(p=0.5), lambda s: 0.25 * torch.log(s)).train()
    x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sigma = torch.full((4,), 1.0)
    # Same sigma for both passes: identical masks must give identical outputs.
    pred, target = consistency_pair(model, model, x, z, sigma, sigma)
    assert not target.requires_grad and target.grad_fn is None
    assert pred.requires_grad
    assert torch.equal(pred.detach(), target)
    # A plain second pass (fresh RNG) draws a different mask.
    assert not torch.equal(model(x + z, sigma), target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_match_on_cuda():
    torch.manual_seed(0)
    model = ConsistencyModel(Tiny(p=0.5), lambda s: 0.25 * torch.log(s)).cuda().train()
    x, z = torch.randn(4, 3, 8, 8, device="cuda"), torch.randn(4, 3, 8, 8, device="cuda")
    sigma = torch.full((4,), 1.0, device="cuda")
    pred, target = consistency_pair(model, model, x, z, sigma, sigma)
    assert torch.equal(pred.detach(), target)


def test_sample_intervals_follow_probabilities():
    disc = Discretisation.build(11, 0.002, 80.0, 7.0, -1.1, 2.0)
    g = torch.Generator().manual_seed(0)
    lo, hi, w = sample_intervals(disc, 200_000, generator=g)
    assert torch.all(hi > lo)
    idx = torch.searchsorted(disc.sigmas.float(), lo)
    freq = torch.bincount(idx, minlength=10)[:10].double() / 200_000
    assert torch.allclose(freq, disc.probs, atol=3e-3)
    assert torch.allclose(w, disc.weights[idx].float())


def test_uniform_index_sampling_option():
    disc = Discretisation.build(11, 0.002, 80.0, 7.0, -1.1, 2.0, index_sampling="uniform")
    assert torch.allclose(disc.probs, torch.full((10,), 0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="index_sampling"):
        Discretisation.build(11, 0.002, 80.0, 7.0, -1.1, 2.0, index_sampling="nope")


# -- ICTLoss: the pieces above composed with the curriculum --------------------------------------------------
def reference_loss(ict, total_steps, student, teacher, x, labels, step, teacher_in_grad_mode=False,
                   autocast=contextlib.nullcontext):
    """The per-sample loss as the training step assembled it before the objective was one object."""
    n = (num_scales_sqrt_at if ict.curriculum == "sqrt" else num_scales_at)(step, total_steps, ict.s0, ict.s1)
    disc = Discretisation.build(n, ict.sigma_min, ict.sigma_max, ict.rho, ict.p_mean, ict.p_std, ict.index_sampling)
    sigma_lo, sigma_hi, weight = sample_intervals(disc, x.shape[0], device=x.device)
    z = torch.randn_like(x)
    with autocast():
        pred, target = consistency_pair(student, teacher, x, z, sigma_lo, sigma_hi, labels, teacher_in_grad_mode)
    return weight * METRICS[ict.metric](pred, target, pseudo_huber_c(x.shape[1:]))

VARIANTS = {"ict": {}, "ct": dict(metric="l2", index_sampling="uniform", curriculum="sqrt", s0=2, s1=150)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("grad_mode", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_ict_loss_is_the_loss_the_training_step_assembled(variant, grad_mode, bf16):
    ict = dataclasses.replace(ICTConfig(), **VARIANTS[variant])
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model = ConsistencyModel(Tiny(p=0.3), lambda s: 0.25 * torch.log(s)).train()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in (0, 3, 9):
        torch.manual_seed(100 + step)
        got = ICTLoss(ict, 10)(model, model, x, None, step, teacher_in_grad_mode=grad_mode, autocast=autocast)
        torch.manual_seed(100 + step)
        want = reference_loss(ict, 10, model, model, x, None, step, grad_mode, autocast)
        assert got.shape == (6,) and got.dtype == torch.float32 and got.requires_grad
        assert torch.equal(got, want), (step, got, want)
    torch.manual_seed(0)
    other = ICTLoss(ict, 10)(model, model, x, None, 9, autocast=autocast)
    assert not torch.equal(other, got)  # another seed draws other intervals, noise and masks


def test_ict_loss_curriculum_discretisation_and_teacher_decay():
    paper = ICTLoss(ICTConfig(), 400_000)  # K = 400k: K' = 50k steps per stage (iCT eq. 6)
    assert [paper.num_scales(k) for k in (0, 49_999, 50_000, 350_000, 399_999)] == [11, 11, 21, 1281, 1281]
    disc = paper.discretisation(0)
    assert torch.allclose(disc.sigmas, torch.tensor([0.002, 0.016720753, 0.085087203, 0.31828329, 0.96541693,
                                                      2.5152190, 5.8389476, 12.381576, 24.408342, 45.313734, 80.0],
                                                     dtype=torch.float64), rtol=1e-7)
    assert torch.allclose(disc.probs[:4], torch.tensor([0.06263, 0.18174, 0.24550, 0.21349], dtype=torch.float64),
                          atol=5e-6)
    assert disc.weights[0].item() == pytest.approx(67.931307, rel=1e-7)
    assert paper.discretisation(50_000).sigmas.shape == (21,)
    assert paper.teacher_decay(0) == pytest.approx(0.9) and paper.teacher_decay(399_999) == pytest.approx(
        math.exp(11 * math.log(0.9) / 1281), abs=1e-15)
    assert ICTLoss(dataclasses.replace(ICTConfig(), teacher_mu0=0.0), 10).teacher_decay(5) == 0.0  # theta^- = theta
    ct = ICTLoss(dataclasses.replace(ICTConfig(), curriculum="sqrt", s0=2, s1=150), 600)
    assert [ct.num_scales(k) for k in (0, 600)] == [2, 151] and ct.teacher_decay(0) == pytest.approx(0.9)


def test_ict_loss_refuses_an_unknown_metric_or_curriculum():
    with pytest.raises(ValueError, match="ict.metric='l1'"):
        ICTLoss(dataclasses.replace(ICTConfig(), metric="l1"), 10)
    with pytest.raises(ValueError, match="ict.curriculum='linear'"):
        ICTLoss(dataclasses.replace(ICTConfig(), curriculum="linear"), 10)


def test_train_step_seeds_each_micro_batch_and_accumulates_the_objective():
    cfg = load_config([], ["train.total_steps=20", "train.seed=5", "ict.s1=40", "train.precision=fp32"])
    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def backend_and_model():
        torch.manual_seed(0)
        backend = Backend(cfg.parallel, ExecutionConfig.from_train(cfg.train), torch.device("cpu"))
        backend.prepare(ConsistencyModel(Tiny(p=0.3), lambda s: 0.25 * torch.log(s)).train(), make_optimizer(cfg))
        return backend

    backend, objective = backend_and_model(), ICTLoss(cfg.ict, cfg.train.total_steps)
    result = train_step(backend, objective, [(x[0], None), (x[1], None)], 7, cfg.train.seed)
    grads = [p.grad.clone() for p in backend.model.parameters()]
    ref = backend_and_model()
    total = 0.0
    for i in range(2):  # micro-batch i of rank 0 in a world of 1: its seed, its share of the mean
        torch.manual_seed(micro_batch_seed(cfg.train.seed, 7, i))
        loss = reference_loss(cfg.ict, 20, ref.model, ref.model, x[i], None, 7).mean() / 2
        loss.backward()
        total += loss.detach()
    assert torch.equal(result.loss, total) and result.num_scales == objective.num_scales(7) == 21
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, ref.model.parameters()))
