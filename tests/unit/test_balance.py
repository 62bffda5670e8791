"""Balanced micro-batches: the deal is a permutation of the step, optimal or near it, pure, and exact in the stream."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prolong_lit.data.balance import assign_step, identity_assignment, row_cost, slowest_rank_cost
from prolong_lit.data.datamodule import MixtureDataModule
from prolong_lit.data.mixture import StreamLayout
from tests.helpers.data_factory import make_sample

WEIGHTS = {"a": 0.3, "b": 0.3, "c": 0.03, "d": 0.37}


def make_dm(data_dir, **kwargs) -> MixtureDataModule:
    args = {"weights": WEIGHTS, "seq_len": 64, "micro_batch_size": 2, "val_samples_per_domain": 3, "num_workers": 0,
            "balance_micro_batches": True}
    return MixtureDataModule(str(data_dir), **{**args, **kwargs})


def brute_force_best(costs: np.ndarray, slots: int, world: int, mb: int) -> int:
    """The least Σ over slots of the slowest rank's cost over every way to deal the rows (tiny cases only)."""
    grid = (slots, world, mb)
    return min(slowest_rank_cost(costs, np.array(p).reshape(grid)) for p in itertools.permutations(range(costs.size)))


def test_row_cost_is_the_sum_of_squared_document_lengths():
    assert row_cost([65536]) == 65536**2
    assert row_cost(np.array([3, 4, 5], dtype=np.int32)) == 50
    assert row_cost([524288]) == 2**38  # no int32 overflow


def test_hand_built_step_halves_the_wait():
    # 2 ranks, 2 micro-batches of 1 row: a 64K single-document row and a row of 64 1K documents, twice, in the
    # stream order long, short, long, short. The layout puts one long row on each rank in both micro-batches.
    long, short = row_cost([65536]), row_cost([1024] * 64)
    costs = np.array([long, short, long, short])
    before = slowest_rank_cost(costs, identity_assignment(2, 2, 1))
    dealt = assign_step(costs, slots=2, world_size=2, micro_batch_size=1)
    assert before == 2 * long
    assert dealt.tolist() == [[[0], [2]], [[1], [3]]]  # both long rows in the first micro-batch
    assert slowest_rank_cost(costs, dealt) == long + short


def test_lpt_inside_a_micro_batch():
    # 2 ranks x 2 rows: the layout gives rank 0 rows 9 and 8 (17) and rank 1 rows 1 and 0; dealt: 9 + 0 and 8 + 1
    costs = np.array([9, 8, 1, 0])
    assert slowest_rank_cost(costs, identity_assignment(1, 2, 2)) == 17
    dealt = assign_step(costs, slots=1, world_size=2, micro_batch_size=2)
    assert dealt.tolist() == [[[0, 3], [1, 2]]]
    assert slowest_rank_cost(costs, dealt) == 9


@pytest.mark.parametrize("seed", range(5))
def test_one_row_per_micro_batch_is_optimal(seed):
    costs = np.random.default_rng(seed).integers(0, 100, size=6)
    dealt = assign_step(costs, slots=3, world_size=2, micro_batch_size=1)
    assert slowest_rank_cost(costs, dealt) == brute_force_best(costs, 3, 2, 1)


@pytest.mark.parametrize("seed", range(5))
def test_several_rows_per_micro_batch_near_optimal(seed):
    costs = np.random.default_rng(seed).integers(0, 100, size=8) ** 2
    dealt = assign_step(costs, slots=2, world_size=2, micro_batch_size=2)
    best = brute_force_best(costs, 2, 2, 2)
    assert best <= slowest_rank_cost(costs, dealt) <= 4 / 3 * best  # LPT's bound, per slot
    assert slowest_rank_cost(costs, dealt) <= slowest_rank_cost(costs, identity_assignment(2, 2, 2))


@pytest.mark.parametrize("grid", [(8, 8, 1), (3, 4, 2), (1, 1, 1), (5, 1, 3)])
def test_deal_is_a_permutation_and_deterministic(grid):
    rng = np.random.default_rng(0)
    costs = rng.integers(0, 5, size=int(np.prod(grid)))  # many ties
    dealt = assign_step(costs, *grid)
    assert dealt.shape == grid and sorted(dealt.ravel().tolist()) == list(range(costs.size))
    assert np.array_equal(dealt, assign_step(costs.copy(), *grid))
    slot_costs = costs[dealt].sum(axis=2).max(axis=1)  # (slots,)
    assert np.all(np.diff(slot_costs) <= 0)  # the most expensive micro-batch first
    if grid[1] == 1 and grid[2] == 1:  # one rank, one row: nothing to balance, the cost is the sum
        assert slowest_rank_cost(costs, dealt) == costs.sum()
    with pytest.raises(ValueError, match="costs for"):
        assign_step(costs[:-1], *grid)


def test_layout_slots():
    layout = StreamLayout(start=10, micro_batch_size=2, accumulate=3, world_size=2, phase=1)
    assert [layout.step_slots(s) for s in range(3)] == [2, 3, 3]
    assert [layout.slot_of(m) for m in range(8)] == [0, 1, 0, 1, 2, 0, 1, 2]
    # without balancing the stream's deal is the layout's arithmetic
    for m in range(8):
        step = layout.step_of(m)
        grid = layout.step_indices(step)[identity_assignment(layout.step_slots(step), 2, 2)]
        for rank in range(2):
            assert np.array_equal(grid[layout.slot_of(m), rank], layout.micro_batch_indices(m, rank))


# -- in the stream, on real litdata shards -----------------------------------------------------------------------


def step_sets(dm: MixtureDataModule, world: int, accumulate: int, steps: int, phase: int = 0) -> list[list[int]]:
    """The sorted global indices each optimizer step trains on, over every rank's micro-batches."""
    streams = [dm.train_stream(rank, world, accumulate, phase) for rank in range(world)]
    layout = streams[0].layout
    sets: list[list[int]] = [[] for _ in range(steps)]
    m = 0
    while layout.step_of(m) < steps:
        for stream in streams:
            sets[layout.step_of(m)] += stream.micro_batch(m).sample_index.tolist()
        m += 1
    return [sorted(s) for s in sets]


def test_balanced_steps_train_on_the_same_rows(mixture_dir):
    balanced, plain = make_dm(mixture_dir), make_dm(mixture_dir, balance_micro_batches=False)
    for dm in (balanced, plain):
        dm.setup("fit")
    assert step_sets(balanced, 2, 3, 4) == step_sets(plain, 2, 3, 4) == [
        list(range(s * 12, (s + 1) * 12)) for s in range(4)
    ]
    # elastic: 1 rank x 6 micro-batches and 3 ranks x 2 make the same 12-row steps
    assert step_sets(balanced, 1, 6, 4) == step_sets(balanced, 3, 2, 4) == step_sets(plain, 2, 3, 4)
    # the step's loss tokens, and every row's content, do not depend on the deal
    ours, theirs = (dm.train_stream(0, 2, 3) for dm in (balanced, plain))
    assert [ours.step_loss_tokens(k) for k in range(4)] == [theirs.step_loss_tokens(k) for k in range(4)]
    assert any(not np.array_equal(ours.micro_batch_indices(m), theirs.micro_batch_indices(m)) for m in range(12))
    batch = ours.micro_batch(0)
    for row, k in enumerate(batch.sample_index.tolist()):
        d, item = balanced.plan[k]
        expected = make_sample(item, balanced.domains[d], 64, with_loss_mask=balanced.domains[d] == "c")
        assert np.array_equal(batch.input_ids[row].numpy(), expected["input_ids"])


def test_balancing_lowers_the_wait(mixture_dir):
    dm, plain = make_dm(mixture_dir, micro_batch_size=1), make_dm(mixture_dir, micro_batch_size=1,
                                                                 balance_micro_batches=False)
    dm.setup("fit")
    plain.setup("fit")
    waits = {}
    for name, module in (("balanced", dm), ("plain", plain)):
        streams = [module.train_stream(rank, 4, 4) for rank in range(4)]
        total = 0
        for m in range(4 * 10):  # 10 steps of 4 micro-batches on 4 ranks
            costs = [row_cost(make_sample(*_item(module, int(s.micro_batch_indices(m)[0])), 64)["doc_lengths"])
                     for s in streams]
            total += max(costs)
        waits[name] = total
    assert waits["balanced"] < 0.9 * waits["plain"], waits


def _item(dm: MixtureDataModule, k: int) -> tuple[int, str]:
    d, item = dm.plan[k]
    return item, dm.domains[d]


def test_resumed_and_worker_streams_deal_the_same(mixture_dir):
    dm = make_dm(mixture_dir)
    full = step_sets(dm, 2, 2, 6)
    # a resume after 3 steps of 8 rows starts at sample 24 and deals steps 3.. exactly as the full run
    resumed = make_dm(mixture_dir)
    resumed.setup("fit")
    resumed.load_state_dict({**resumed.state_dict(), "consumed_samples": 24})
    first = dm.train_stream(1, 2, 2)
    again = resumed.train_stream(1, 2, 2)
    for m in range(6):
        assert np.array_equal(again.micro_batch_indices(m), first.micro_batch_indices(m + 6))
    assert step_sets(resumed, 2, 2, 3) == full[3:]
    # with dataloader workers the same micro-batches arrive in the same order
    single = [b.sample_index.tolist() for b in itertools.islice(iter(make_dm(mixture_dir).train_dataloader()), 7)]
    multi = [b.sample_index.tolist()
             for b in itertools.islice(iter(make_dm(mixture_dir, num_workers=2).train_dataloader()), 7)]
    assert single == multi


def test_first_step_after_an_accumulation_change_is_dealt_alone(mixture_dir):
    dm = make_dm(mixture_dir)
    dm.setup("fit")
    # phase 1 of accumulation 3: the first step has 2 micro-batches (8 rows) and stays within them
    assert step_sets(dm, 2, 3, 2, phase=1) == [list(range(8)), list(range(8, 20))]


def test_balance_setting_is_checked(mixture_dir):
    from prolong_lit.errors import ConfigError

    with pytest.raises(ConfigError, match="data.balance_micro_batches must be true or false"):
        make_dm(mixture_dir, balance_micro_batches="yes")
