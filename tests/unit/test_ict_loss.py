"""The objective: per-sample pseudo-Huber, parameterisation boundary condition, teacher/student pass."""
import math

import pytest
import torch
from torch import nn

from ict_scale.ict import (ConsistencyModel, Discretisation, boundary_scalings, consistency_pair, pseudo_huber,
                           pseudo_huber_c, sample_intervals)


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
