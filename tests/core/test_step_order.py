"""The step order: a seeded permutation of the records per epoch, computed on the fly (no per-record memory)."""

from __future__ import annotations

import numpy as np
import pytest

from mmopd.data.step_order import permute, step_indices

SIZES = (1, 2, 3, 4, 5, 7, 8, 16, 97, 256, 1000, 1024, 4099, 65536, 65537)


@pytest.mark.parametrize("n", SIZES)
def test_each_epochs_order_is_a_bijection_of_the_records(n):
    for seed, epoch in ((0, 0), (3, 1), (2**40, 7)):
        order = permute(np.arange(n), n, seed, epoch)
        assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))


def test_another_seed_or_epoch_is_another_order_and_the_same_ones_the_same_order():
    n = 1000
    orders = {(seed, epoch): permute(np.arange(n), n, seed, epoch).tolist() for seed in range(4) for epoch in range(4)}
    assert len({tuple(order) for order in orders.values()}) == 16
    assert permute(np.arange(n), n, 2, 3).tolist() == orders[2, 3]


def test_the_order_is_well_mixed():
    n = 1000
    order = permute(np.arange(n), n, seed=0, epoch=0)
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.1  # no trace of the input order
    assert np.count_nonzero(order == np.arange(n)) <= 5  # fixed points: 1 expected of a random permutation
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.1  # neighbours are not related


def test_every_record_is_equally_likely_at_every_position():
    n, keys = 10, 2000  # 2000 orders of 10 records: which record lands at each position
    counts = np.zeros((n, n), dtype=np.int64)  # [position, record]
    for seed in range(keys):
        counts[np.arange(n), permute(np.arange(n), n, seed, epoch=0)] += 1
    chi2 = ((counts - keys / n) ** 2 / (keys / n)).sum(axis=1)  # [n] per position, 9 degrees of freedom
    assert chi2.max() < 30  # p < 0.0005 for one position at 9 degrees of freedom


def test_steps_walk_the_epochs_in_order_and_any_step_is_reproduced_alone():
    n, batch = 10, 4  # steps 0..4 read 20 records: two whole epochs, a step across each boundary
    read = [i for step in range(5) for i in step_indices(n, step, batch, seed=5)]
    assert read == permute(np.arange(n), n, 5, 0).tolist() + permute(np.arange(n), n, 5, 1).tolist()
    assert step_indices(n, 2, batch, seed=5) == read[8:12]  # across the boundary, from the step counter alone
    assert step_indices(3, 0, 7, seed=1) == (permute(np.arange(3), 3, 1, 0).tolist()
                                             + permute(np.arange(3), 3, 1, 1).tolist()
                                             + permute(np.arange(1), 3, 1, 2).tolist())  # a batch over 3 epochs


def test_a_step_of_a_billion_records_is_read_without_an_order_in_memory():
    n = 10**9
    got = step_indices(n, 123_456_789, 8, seed=0)
    assert len(set(got)) == 8 and all(0 <= i < n for i in got)
    assert got == permute(np.arange(123_456_789 * 8, 123_456_790 * 8), n, 0, 0).tolist()
