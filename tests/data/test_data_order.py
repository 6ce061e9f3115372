"""The global order: exactly once per epoch across ranks x workers, exact resume, elastic resume."""
from collections import Counter

import numpy as np
import pytest
import torch

from data_helpers import identity, loader, make_synthetic_shards, stored_identities, take
from ict_scale.data.order import GlobalOrder

NUM, SHARD = 300, 64  # five shards of 64, 64, 64, 64 and 44 samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(str(tmp_path_factory.mktemp("syn")), NUM, SHARD)


def test_order_visits_every_member_once_per_epoch_and_reshuffles():
    order = GlobalOrder([5, 3, 7, 1], seed=3)
    epochs = [order.locate(np.arange(e * 16, (e + 1) * 16)) for e in range(2)]
    for e, (epoch, shard, member) in enumerate(epochs):
        assert (epoch == e).all()
        assert sorted(zip(shard.tolist(), member.tolist())) == [(s, m) for s, n in enumerate([5, 3, 7, 1])
                                                                 for m in range(n)]
    assert not np.array_equal(epochs[0][1], epochs[1][1]) or not np.array_equal(epochs[0][2], epochs[1][2])
    assert np.array_equal(GlobalOrder([5, 3, 7, 1], seed=3).locate(np.arange(40))[2], order.locate(np.arange(40))[2])
    assert not np.array_equal(GlobalOrder([5, 3, 7, 1], seed=4).locate(np.arange(16))[2], epochs[0][2])


def test_exactly_once_across_two_ranks_and_two_workers(shards):
    """Two epochs: within each, every stored sample appears exactly once over both ranks."""
    per_rank = [take(loader(shards, batch_per_rank=25, rank=r, world_size=2, num_workers=2, hflip=False), 12)[0]
                for r in range(2)]
    stored = Counter(stored_identities(shards, 8))
    assert len(stored) == NUM  # synthetic samples are distinct
    for epoch in range(2):
        # Global batch k is rank 0's k-th batch then rank 1's; an epoch is 6 global batches of 50.
        seen = [identity(per_rank[r][k * 25 + i]) for k in range(epoch * 6, epoch * 6 + 6)
                for r in range(2) for i in range(25)]
        assert Counter(seen) == stored


def test_resume_mid_epoch_equals_uninterrupted_stream(shards):
    """Stop after 5 batches, restore the state into a fresh loader: the next 7 batches are identical
    (the run crosses an epoch boundary; flips on; workers 2)."""
    reference = take(loader(shards, batch_per_rank=40, num_workers=2, seed=7), 12)
    first = loader(shards, batch_per_rank=40, num_workers=2, seed=7)
    head = take(first, 5)
    state = first.state_dict()
    first.close()
    resumed = loader(shards, batch_per_rank=40, num_workers=2, seed=7)
    resumed.load_state_dict(state)
    tail = take(resumed, 7)
    assert torch.equal(torch.cat([head[0], tail[0]]), reference[0])
    assert torch.equal(torch.cat([head[1], tail[1]]), reference[1])


def test_elastic_resume_from_two_ranks_to_three_continues_the_global_order(shards):
    """2 ranks x 30 (2 workers) for 4 batches, then 3 ranks x 15 (1 worker) from rank 0's state:
    the concatenated global batches equal one rank reading the same global order."""
    reference = take(loader(shards, batch_per_rank=15, num_workers=0, seed=5), 28)[0]
    two = [loader(shards, batch_per_rank=30, rank=r, world_size=2, num_workers=2, seed=5) for r in range(2)]
    phase_a = [take(l, 4)[0] for l in two]
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # every rank holds the same state
    three = [loader(shards, batch_per_rank=15, rank=r, world_size=3, num_workers=1, seed=5) for r in range(3)]
    for l in three:
        l.load_state_dict(state)
    phase_b = [take(l, 4)[0] for l in three]
    stream = [phase_a[r][k * 30:(k + 1) * 30] for k in range(4) for r in range(2)]
    stream += [phase_b[r][k * 15:(k + 1) * 15] for k in range(4) for r in range(3)]
    assert torch.equal(torch.cat(stream), reference)


def test_state_from_another_seed_or_dataset_is_refused(shards, tmp_path):
    state = loader(shards, batch_per_rank=8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        loader(shards, batch_per_rank=8, seed=2).load_state_dict(state)
    other = make_synthetic_shards(str(tmp_path / "other"), NUM, 100)  # same size, other shards
    with pytest.raises(ValueError, match="fingerprint"):
        loader(other, batch_per_rank=8, seed=1).load_state_dict(state)
