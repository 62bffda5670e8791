"""The pure global stream: shares, purity, per-domain epochs, and the rank/step layout."""

from __future__ import annotations

import numpy as np
import pytest

from prolong_lit.data.mixture import BLOCK_SIZE, MixturePlan, StreamLayout, block_counts

DOMAINS = ["a", "b", "c", "d"]
WEIGHTS = [0.3, 0.3, 0.03, 0.37]
TRAIN_ITEMS = [37, 101, 5, 260]


def reference_stream(plan: MixturePlan, n: int) -> list[tuple[int, int]]:
    """The same stream generated the slow, stateful way: walk the blocks in order and pull the next item of
    each domain from a per-domain cursor that reshuffles at every pass. Shares only the seeded permutations."""
    cursors = [0] * len(plan.domains)
    out: list[tuple[int, int]] = []
    b = 0
    while len(out) < n:
        rng = np.random.RandomState([plan.seed, 0, b])
        slots = np.repeat(np.arange(len(plan.domains)), plan.counts)[rng.permutation(plan.block_size)]
        for d in slots:
            epoch, r = divmod(cursors[d], plan.train_items[d])
            perm = np.random.RandomState([plan.seed, 1, plan._domain_keys[d], epoch]).permutation(plan.train_items[d])
            out.append((int(d), int(perm[r])))
            cursors[d] += 1
        b += 1
    return out[:n]


def test_block_counts_largest_remainder():
    assert block_counts(WEIGHTS).tolist() == [300, 300, 30, 370]
    # thirds: 333.33 each, the one spare slot goes to the first domain (ties break by index)
    assert block_counts([1, 1, 1]).tolist() == [334, 333, 333]
    counts = block_counts([0.123, 0.456, 0.2, 0.221], block_size=7)
    assert counts.sum() == 7 and np.all(np.abs(counts - np.array([0.123, 0.456, 0.2, 0.221]) * 7) < 1)


@pytest.mark.parametrize("start", [0, 1234])
def test_shares_within_one_point_over_10000_samples(start):
    plan = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=42)
    domains, _ = plan.lookup(np.arange(start, start + 10_000))
    shares = np.bincount(domains, minlength=4) / 10_000
    assert np.abs(shares - np.array(WEIGHTS)).max() < 0.01, shares
    if start == 0:  # whole blocks: exactly the largest-remainder counts
        assert np.bincount(domains).tolist() == [3000, 3000, 300, 3700]


def test_random_access_matches_the_stateful_reference():
    plan = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=7)
    n = 3 * BLOCK_SIZE + 17
    expected = reference_stream(plan, n)
    # ask a fresh plan in a scrambled order, so no cache or call order can help
    order = np.random.default_rng(0).permutation(n)
    fresh = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=7)
    got = {int(k): fresh[int(k)] for k in order}
    assert [got[k] for k in range(n)] == expected


def test_pure_in_seed_and_index():
    one = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=3)
    two = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=3)
    other = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=4)
    idx = np.arange(5000, 7000)
    a, b, c = one.lookup(idx), two.lookup(idx[::-1]), other.lookup(idx)
    assert np.array_equal(a[0], b[0][::-1]) and np.array_equal(a[1], b[1][::-1])
    assert not np.array_equal(a[0], c[0])  # the seed matters


def test_every_pass_over_a_domain_visits_each_training_item_once():
    plan = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=42)
    domains, items = plan.lookup(np.arange(4000))
    d_items = items[domains == 1]  # domain 'b', 101 training items, ~1200 uses
    passes = [d_items[i : i + 101] for i in range(0, 101 * 3, 101)]
    for p in passes:
        assert sorted(p.tolist()) == list(range(101))
    assert passes[0].tolist() != passes[1].tolist()  # a fresh order each pass
    assert items[domains == 2].max() < 5  # held-out items (>= train_items) never appear


def test_domain_item_order_does_not_depend_on_the_other_domains():
    plan = MixturePlan(DOMAINS, WEIGHTS, TRAIN_ITEMS, seed=42)
    plan2 = MixturePlan(["b", "z"], [0.5, 0.5], [101, 9], seed=42)
    d1, i1 = plan.lookup(np.arange(2000))
    d2, i2 = plan2.lookup(np.arange(2000))
    n = 500
    assert np.array_equal(i1[d1 == 1][:n], i2[d2 == 0][:n])


@pytest.mark.parametrize("phase", [0, 2])
def test_layout_partitions_the_stream_into_steps(phase):
    layout = StreamLayout(start=100, micro_batch_size=2, accumulate=3, world_size=2, phase=phase)
    assert layout.samples_per_step == 12
    # micro-batches 0..8 of both ranks cover [100, 136) exactly once
    covered = np.concatenate([layout.micro_batch_indices(m, r) for m in range(9) for r in range(2)])
    assert sorted(covered.tolist()) == list(range(100, 136))
    # each step is exactly the union of its micro-batches over ranks
    for step in range(3):
        ms = [m for m in range(12) if layout.step_of(m) == step]
        assert len(ms) == (3 - phase if step == 0 else 3)
        union = np.concatenate([layout.micro_batch_indices(m, r) for m in ms for r in range(2)])
        assert sorted(union.tolist()) == layout.step_indices(step).tolist()
    assert layout.consumed(0) == 100
    assert layout.consumed(2) == 100 + (2 * 3 - phase) * 4


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="one weight"):
        MixturePlan(["a"], [1.0, 2.0], [3], seed=0)
    with pytest.raises(ValueError, match="training item"):
        MixturePlan(["a", "b"], [1.0, 2.0], [3, 0], seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        MixturePlan(["a"], [1.0], [3], seed=0).lookup([-1])
