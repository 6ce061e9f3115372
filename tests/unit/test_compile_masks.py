"""Per-block torch.compile keeps student and teacher dropout masks identical (every block compiled)."""
import pytest
import torch

from ict_scale.ict import ConsistencyModel, consistency_pair
from ict_scale.networks import build_network, network_c_noise
from ict_scale.parallel.blocks import apply_compile


@pytest.mark.slow
def test_compiled_blocks_draw_the_same_masks_in_both_passes():
    torch.manual_seed(0)
    net = build_network("ncsnpp", model_channels=16, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(),
                        img_resolution=8, dropout=0.5, label_dim=0)
    with torch.no_grad():  # break the zero init so that every block's dropout reaches the output
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = ConsistencyModel(net, network_c_noise("ncsnpp")).train()
    apply_compile(model)
    x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sigma = torch.full((4,), 1.0)
    for _ in range(2):  # the second round runs the cached graphs of both variants
        pred, target = consistency_pair(model, model, x, z, sigma, sigma)
        assert torch.allclose(pred.detach(), target, atol=1e-5), (pred.detach() - target).abs().max()
