"""Reservoir and row_key: bottom-k sampling against brute force and an unsigned reference."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qvd_bench.collect.reservoir import ROW_ID_FIELDS, Reservoir, _bottom_k, row_key
from tests.collect.helpers import (
    CALLS,
    RES_C,
    RES_CAP,
    copy,
    fill,
    sample_rows,
)
from tests.references import (
    PROPERTY,
)


def _mix_reference(z: int) -> int:
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def row_key_reference(seed, sample_id, timestep, branch, row) -> int:
    """The documented hash in unsigned 64-bit Python integers."""
    m = (1 << 64) - 1
    bits = int(np.float64(timestep + 0.0).view(np.uint64))
    h = seed & m
    for f in (sample_id, bits, branch, row):
        h = _mix_reference(((h ^ (f & m)) + 0x9E3779B97F4A7C15) & m)
    return h & ((1 << 63) - 1)


def test_row_key_matches_unsigned_reference_and_is_deterministic():
    ids, rows = torch.tensor([0, 1, 7, 123456789]), torch.arange(5)
    for seed, t, branch in ((0, 0.0, 0), (42, 999.0, 1), (-5, 0.125, 1), (2**40, -0.0, 0)):
        keys = row_key(seed, ids[:, None], t, branch, rows[None, :])
        assert keys.dtype == torch.int64 and bool((keys >= 0).all())
        assert torch.equal(keys, row_key(seed, ids[:, None], t, branch, rows[None, :]))
        for i, s in enumerate(ids.tolist()):
            for r in rows.tolist():
                assert int(keys[i, r]) == row_key_reference(seed, s, t, branch, r)
    assert len(set(row_key(3, torch.arange(1000), 1.0, 0, 0).tolist())) == 1000


def test_row_key_of_int_fields_matches_tensor_fields():
    # Int sample ids and branches are folded on the host; tensors take the general path.
    rows = torch.tensor([0, 1, 2047, -1, 2**62])
    for seed, sample, t, branch in (
        (0, 0, 901.0, 0),
        (-5, -3, -0.0, 1),
        (2**63 - 1, -(2**63), 1e300, 2**40),
        (12345, 2**63 - 1, 0.1, -1),
    ):
        keys = row_key(seed, sample, t, branch, rows)
        assert torch.equal(keys, row_key(seed, torch.tensor(sample), t, torch.tensor(branch), rows))
        assert keys.tolist() == [
            row_key_reference(seed, sample, t, branch, r) for r in rows.tolist()
        ]


def assert_reservoirs_identical(a: Reservoir, b: Reservoir) -> None:
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_reservoir_is_bottom_k_of_all_keys():
    samples = list(range(8))
    res = fill(Reservoir(RES_CAP, RES_C, seed=11), samples)
    everything = [
        (row_key_reference(11, s, t, b, r), s, t, b, r)
        for t, b in CALLS
        for s in samples
        for r in range(9)
    ]
    best = sorted(everything)[:RES_CAP]
    state = res.state_dict()
    assert state["keys"].tolist() == [k for k, *_ in best]
    assert state["sample_ids"].tolist() == [s for _, s, *_ in best]
    assert state["timesteps"].tolist() == [t for _, _, t, _, _ in best]
    assert state["branches"].tolist() == [b for *_, b, _ in best]
    assert state["row_indices"].tolist() == [r for *_, r in best]
    for row, (_, s, t, b, r) in zip(state["rows"], best):
        assert torch.equal(row, sample_rows(s, t, b)[r])


def test_reservoirs_of_one_call_share_keys_only_where_they_agree():
    # Layers of one denoiser call reuse the call's keys; another seed, row count, sample,
    # timestep or branch gets its own (each reservoir is its own bottom-k of row_key).
    calls = [(11, [0, 1], 500.0, 0, 9), (11, [0, 1], 500.0, 0, 9), (12, [0, 1], 500.0, 0, 9),
             (11, [0, 1], 500.0, 0, 5), (11, [1, 2], 500.0, 0, 9), (11, [0, 1], 250.0, 0, 9),
             (11, [0, 1], 500.0, 1, 9)]  # fmt: skip
    for seed, ids, t, b, rows in calls:
        res = Reservoir(4, RES_C, seed=seed)
        res.update(torch.stack([sample_rows(s, t, b)[:rows] for s in ids]), ids, t, b)
        everything = sorted(row_key_reference(seed, s, t, b, r) for s in ids for r in range(rows))
        assert res.state_dict()["keys"].tolist() == everything[:4]


def test_reservoir_sharded_updates_equal_single_pass():
    single = fill(Reservoir(RES_CAP, RES_C, seed=5), list(range(10)), batch=3)
    shards = [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    parts = [fill(Reservoir(RES_CAP, RES_C, seed=5), s, batch=1) for s in shards]
    assert_reservoirs_identical(parts[2].merge(parts[0]).merge(parts[1]), single)


def test_reservoir_takes_sample_ids_as_ints_or_tensor():
    rows = torch.stack([sample_rows(s, 7.0, 1, rows=40) for s in (3, 8)])
    a, b = Reservoir(25, RES_C, seed=2), Reservoir(25, RES_C, seed=2)
    for t in (999.0, 7.0, 3.0):
        a.update(rows, torch.tensor([3, 8]), t, 1)
        b.update(rows, (3, 8), t, 1)
    assert_reservoirs_identical(a, b)
    with pytest.raises(ValueError):
        b.update(rows, (3,), 1.0, 0)


def test_reservoir_below_capacity_and_idempotent_merge():
    res = fill(Reservoir(1000, RES_C, seed=0), [0, 1])
    assert len(res) == 2 * 9 * len(CALLS)
    again = copy(res).merge(copy(res))
    assert_reservoirs_identical(again, res)


@PROPERTY
@given(
    st.permutations(list(range(9))),
    st.lists(st.integers(0, 2), min_size=9, max_size=9),
    st.integers(1, 40),
    st.integers(0, 2**62),
)
def test_reservoir_independent_of_sharding_and_order(order, shard_of, capacity, seed):
    single = fill(Reservoir(capacity, RES_C, seed=seed), list(range(9)), batch=9)
    shards = [[s for s in order if shard_of[s] == k] for k in range(3)]
    parts = [
        fill(Reservoir(capacity, RES_C, seed=seed), s, calls=CALLS[::-1], batch=2) for s in shards
    ]
    random.Random(seed).shuffle(parts)
    assert_reservoirs_identical(parts[0].merge(parts[1].merge(parts[2])), single)


def test_bottom_k_breaks_key_ties_by_row_identity_and_drops_duplicates():
    rng = random.Random(1)
    rows = [
        (
            rng.randrange(4),
            rng.randrange(3),
            float(rng.randrange(2)),
            rng.randrange(2),
            rng.randrange(3),
        )
        for _ in range(200)
    ]
    ids = {
        name: torch.tensor(
            [r[i] for r in rows], dtype=torch.float64 if name == "timesteps" else torch.int64
        )
        for i, name in enumerate(ROW_ID_FIELDS)
    }
    for k in (1, 5, 17, 500):
        got = [rows[i] for i in _bottom_k(ids, k).tolist()]
        assert got == sorted(set(rows))[:k]


def test_reservoir_rejects_other_config_and_bad_rows():
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).merge(Reservoir(4, 3, seed=1))
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).merge(Reservoir(5, 3, seed=0))
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).update(torch.zeros(2, 5, 4), torch.tensor([0, 1]), 1.0, 0)
    with pytest.raises(ValueError):
        Reservoir(4, 3, seed=0).update(torch.zeros(2, 5, 3), torch.tensor([0]), 1.0, 0)
