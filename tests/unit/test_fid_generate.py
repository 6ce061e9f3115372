"""Sample partition over ranks and per-sample seeding: the sample set does not depend on ranks or batches."""
import pytest
import torch

from ict_scale.eval import rank_indices, sample_inputs, sample_rng


@pytest.mark.parametrize("num", [1, 5, 7, 50000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_indices_are_disjoint_contiguous_and_cover(num, world_size):
    shares = [rank_indices(num, r, world_size) for r in range(world_size)]
    flat = [i for s in shares for i in s]
    assert flat == list(range(num))  # disjoint, in order, complete: no padding, no duplicates
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_rank_outside_world_raises():
    with pytest.raises(ValueError, match="rank 2"):
        rank_indices(10, 2, 2)


def test_each_sample_depends_only_on_seed_and_index():
    shape = (3, 4, 4)
    z_all, renoise_all, labels_all = sample_inputs(range(10), shape, seed=5, num_classes=1000, num_renoise=1)
    z_some, renoise_some, labels_some = sample_inputs([7, 2, 3], shape, seed=5, num_classes=1000, num_renoise=1)
    rows = [7, 2, 3]
    assert torch.equal(z_some, z_all[rows]) and torch.equal(renoise_some[0], renoise_all[0][rows])
    assert torch.equal(labels_some, labels_all[rows])
    assert labels_all.dtype == torch.int64 and 0 <= int(labels_all.min()) and int(labels_all.max()) < 1000
    assert not torch.equal(z_all[0], z_all[1])
    z_other_seed, _, _ = sample_inputs(range(10), shape, seed=6, num_classes=1000, num_renoise=1)
    assert not torch.equal(z_other_seed, z_all)


def test_one_step_noise_does_not_depend_on_extra_steps():
    z1, renoise1, labels1 = sample_inputs(range(4), (3, 2, 2), seed=0, num_classes=0, num_renoise=0)
    z2, renoise2, _ = sample_inputs(range(4), (3, 2, 2), seed=0, num_classes=0, num_renoise=1)
    assert torch.equal(z1, z2) and renoise1 == [] and labels1 is None and len(renoise2) == 1
    assert not torch.equal(renoise2[0], z2)


def test_sample_streams_differ_across_seed_and_index_pairs():
    # Pairs that agree in their low 32 bits once packed into one integer still get distinct streams.
    pairs = [(0, 0), (0, 1), (1, 0), (0, 2 ** 32), (1, 2 ** 32), (2 ** 31, 7)]
    draws = {tuple(sample_rng(s, i).standard_normal(4).tolist()) for s, i in pairs}
    assert len(draws) == len(pairs)
    with pytest.raises(ValueError):
        sample_rng(-1, 0)

