"""The config-time check of attention heads predicts exactly which networks fail to build, and the batch
check suggests sizes that work."""
import itertools

import pytest
import torch

from ict_scale.config import ConfigError, load_config
from ict_scale.config.schema import accumulation_steps
from ict_scale.networks import attention_mismatches, build_network


@pytest.mark.parametrize("model_channels, channel_mult, attn_resolutions, head_channels", list(itertools.product(
    (32, 48, 64), ((1, 2), (1, 3), (2, 3)), ((), (8,), (4,)), (16, 64))))
def test_mismatches_predict_build_failures(model_channels, channel_mult, attn_resolutions, head_channels):
    args = dict(model_channels=model_channels, channel_mult=channel_mult, attn_resolutions=attn_resolutions,
                head_channels=head_channels)
    predicted = attention_mismatches("adm", 8, **args)
    try:
        with torch.device("meta"):
            build_network("adm", img_resolution=8, label_dim=0, num_blocks=1, **args)
        built = True
    except ValueError as e:
        assert "not divisible by head_channels" in str(e)
        built = False
    assert built == (not predicted), predicted


def test_ncsnpp_has_no_head_constraint():
    assert attention_mismatches("ncsnpp", 8, model_channels=24, channel_mult=(1, 3), attn_resolutions=(8, 4)) == []


def test_batch_suggestions_divide():
    cfg = load_config([], ["train.batch_size=12", "train.batch_per_gpu=1"])
    assert accumulation_steps(cfg.train, 4) == 3
    with pytest.raises(ConfigError, match=r"x 5 processes = 5; use train.batch_size=10 or 15$"):
        accumulation_steps(cfg.train, 5)  # no micro-batch size helps: 12 does not divide by 5
    cfg = load_config([], ["train.batch_size=12", "train.batch_per_gpu=4"])
    with pytest.raises(ConfigError, match=r"= 8; use train.batch_size=8 or 16, or train.batch_per_gpu=3$"):
        accumulation_steps(cfg.train, 2)
