"""A short iCT training on a 2-D toy distribution moves one-step samples toward the data."""
import torch
from torch import nn

from ict_scale.config import load_config
from ict_scale.ict import ConsistencyModel, ICTLoss, multistep_sample
from ict_scale.parallel.backend import Backend
from ict_scale.parallel.config import ExecutionConfig
from ict_scale.train.ema import EMA
from ict_scale.train.run import make_optimizer
from ict_scale.train.step import train_step

MODES = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]) * 0.8


class MLP(nn.Module):
    """A backbone for (B, 2, 1, 1) 'images' with a Fourier noise embedding."""

    def __init__(self, width=128):
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(16) * 2, requires_grad=False)
        self.body = nn.Sequential(nn.Linear(2 + 32, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, 2))

    def forward(self, x, noise_labels, class_labels=None):
        e = noise_labels[:, None] * self.freqs[None]
        h = torch.cat([x.flatten(1), e.sin(), e.cos()], 1)
        return self.body(h).view_as(x)


def toy_batch(n, g):
    idx = torch.randint(0, 4, (n,), generator=g)
    return (MODES[idx] + 0.05 * torch.randn(n, 2, generator=g)).view(n, 2, 1, 1)


def distance_to_data(samples):
    """Mean distance from each sample to its nearest mode (0 for perfect samples, ~1.1 for samples at 0)."""
    return torch.cdist(samples.view(-1, 2), MODES).min(1).values.mean().item()


def test_one_step_samples_move_toward_the_data():
    torch.manual_seed(0)
    cfg = load_config([], ["train.total_steps=600", "train.batch_size=256", "train.batch_per_gpu=256",
                           "optim.lr=2e-3", "ict.s1=80", "train.precision=fp32"])
    backend = Backend(cfg.parallel, ExecutionConfig.from_train(cfg.train), torch.device("cpu"))
    backend.prepare(ConsistencyModel(MLP(), lambda s: 0.25 * torch.log(s)), make_optimizer(cfg))
    ema = EMA(backend.ema_targets())
    objective = ICTLoss(cfg.ict, cfg.train.total_steps)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 2, 1, 1, generator=g)

    def one_step():
        with torch.no_grad():
            return multistep_sample(backend.model.eval(), z).clone()

    before = distance_to_data(one_step())
    for step in range(cfg.train.total_steps):
        backend.model.train()
        result = train_step(backend, objective, [(toy_batch(256, g), None)], step, cfg.train.seed)
        assert torch.isfinite(result.loss)
        backend.optimizer_step()
        backend.zero_grad()
        ema.update(backend.ema_targets(), 0.99)
    after = distance_to_data(one_step())
    assert before > 0.9  # the untrained model maps noise close to the origin
    print(f"distance to data: {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)
