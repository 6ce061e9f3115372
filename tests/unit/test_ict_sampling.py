"""Sampling: the k-step noise levels, the noise, and the quantised sampler that grids, `python -m ict_scale.sample`
and the FID stage share."""
import pytest
import torch

from ict_scale.ict import (MAX_STEPS, from_uint8, generate_uint8, multistep_sample, sampling_noise, sampling_sigmas,
                           to_uint8)
from ict_scale.train.grids import fixed_noise, sample_images


def shrink(x, sigma, labels):  # a smooth consistency-like map: shrinks with sigma
    return torch.tanh(x / (1 + sigma.view(-1, 1, 1, 1))) * 1.1


def test_sampling_sigmas():
    assert sampling_sigmas(1, 80.0, 0.821) == (80.0,)
    assert sampling_sigmas(2, 80.0, 1.526) == (80.0, 1.526)
    assert MAX_STEPS == 2
    with pytest.raises(ValueError, match="steps=3"):
        sampling_sigmas(3, 80.0, 0.821)


def test_sampling_noise_draws_z_then_the_renoise_from_one_generator():
    shape = (3, 4, 4)
    z, renoise = sampling_noise(5, shape, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the draws the sample command made before this function existed
    assert torch.equal(z, torch.randn((5, *shape), generator=g))
    assert len(renoise) == MAX_STEPS - 1 and torch.equal(renoise[0], torch.randn((5, *shape), generator=g))
    z_only, none = sampling_noise(5, shape, torch.Generator().manual_seed(3), num_renoise=0)
    assert torch.equal(z_only, z) and none == []  # the one-step noise does not depend on the re-noise drawn


def test_grid_noise_is_the_shared_noise_of_its_seed():
    z, renoise, labels = fixed_noise(6, (3, 4, 4), seed=2, num_classes=4, device=None)
    g = torch.Generator().manual_seed(2 + 7919)  # the grids' stream: z, then the re-noise
    want_z, want_renoise = torch.randn((6, 3, 4, 4), generator=g), torch.randn((6, 3, 4, 4), generator=g)
    assert torch.equal(z, want_z) and len(renoise) == 1 and torch.equal(renoise[0], want_renoise)
    assert labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert fixed_noise(6, (3, 4, 4), seed=2, num_classes=0, device=None)[2] is None


@pytest.mark.parametrize("steps", [1, 2])
def test_grid_samples_are_the_shared_sampler_in_any_batch_size(steps):
    z, renoise = sampling_noise(7, (3, 8, 8), torch.Generator().manual_seed(0))
    want = generate_uint8(shrink, z, renoise, None, sampling_sigmas(steps, 80.0, 0.821), 0.002)
    for batch in (7, 3):
        assert torch.equal(sample_images(shrink, z, renoise, None, 80.0, 0.821, steps, 0.002, batch=batch), want)


def test_generate_uint8_is_the_quantised_multistep_sample():
    z, renoise = sampling_noise(6, (3, 8, 8), torch.Generator().manual_seed(0))
    out = generate_uint8(shrink, z, renoise, None, (80.0, 0.821), 0.002)
    assert out.dtype == torch.uint8
    assert torch.equal(out, to_uint8(multistep_sample(shrink, z, (80.0, 0.821), None, renoise, 0.002)))
    # One step uses z alone: the re-noise passed along is not used.
    assert torch.equal(generate_uint8(shrink, z, renoise, None, (80.0,), 0.002),
                       to_uint8(multistep_sample(shrink, z, (80.0,), None, [], 0.002)))
    # Rounding to nearest: 0 -> 127.5 -> 128 (ties to even), the extremes map to 0 and 255.
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 1 / 127.5 - 1])).tolist() == [0, 128, 255, 1]
    levels = torch.arange(256, dtype=torch.uint8)
    assert from_uint8(levels)[[0, 255]].tolist() == [-1.0, 1.0] and from_uint8(levels).dtype == torch.float32
    assert torch.equal(to_uint8(from_uint8(levels)), levels)  # the data scaling and the quantisation invert
