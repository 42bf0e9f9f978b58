import random

import torch

from soda_distill.training import LengthBuckets


def test_length_buckets_group_a_small_data_set():
    """67 examples, batches of 8: every example once, batches of near-equal lengths, longest first, short batch last,
    and another order for another seed."""
    lengths = [random.Random(i).randint(100, 600) for i in range(67)]
    orders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        orders.append(list(LengthBuckets(lengths, 8)))
    for order in orders:
        assert sorted(order) == list(range(67))
        batches = [order[i : i + 8] for i in range(0, 67, 8)]
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert 1 - sum(lengths) / padded < 0.15  # random batches of 8 from 100–600 pad about 35%
        assert max(lengths[i] for i in batches[0]) == max(lengths)
        assert len(batches[-1]) == 3 and max(lengths[i] for i in batches[-1]) == sorted(lengths)[2]
    assert orders[0] != orders[1]
