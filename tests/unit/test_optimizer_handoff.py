"""Reading a checkpoint's AdamW state by parameter name: single files, distributed checkpoints, sharded params.

The saved state comes from a real AdamW that took real steps; what `load_saved_state` returns must equal it
exactly (rtol = atol = 0), laid out like the receiving parameters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from prolong_lit.callbacks.optimizer_handoff import (
    load_saved_state,
    optimizer_param_names,
    saved_state_shapes,
)
from prolong_lit.checkpoint import DCP_META_FILE, PARAM_NAMES_KEY
from tests.helpers.ports import free_port

# the fixture writes a distributed checkpoint in one process, without a process group, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def make_model(hidden: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 3))


def trained(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with two groups (as LongContextLM's: decayed matrices, then the rest) after 3 steps."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices}, {"params": others, "weight_decay": 0.0}], lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: optimizer.state[p] for group in optimizer.param_groups for p in group["params"]}


def assert_equal_state(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].keys() == expected[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in expected[name].items():
            got = actual[name][key]
            got = got.full_tensor() if hasattr(got, "full_tensor") else got
            torch.testing.assert_close(got, value, rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained model, its optimizer, and its state saved as a single file and as a distributed checkpoint
    (read-only for the tests: built once)."""
    tmp_path = tmp_path_factory.mktemp("source")
    model = make_model()
    optimizer = trained(model)
    single = tmp_path / "single.ckpt"
    torch.save({"optimizer_states": [optimizer.state_dict()],
                PARAM_NAMES_KEY: optimizer_param_names(optimizer, model)}, single)
    distributed = tmp_path / "distributed.ckpt"
    # as Lightning's ModelParallelStrategy writes it: module and optimizer state keyed by name, plus meta.pt
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(distributed), no_dist=True)
    torch.save({"global_step": 3}, distributed / DCP_META_FILE)
    return {"model": model, "expected": by_name(model, optimizer), "single": single, "distributed": distributed}


@pytest.mark.parametrize("kind", ["single", "distributed"])
def test_saved_state_is_read_by_name(source, kind):
    params = dict(make_model().named_parameters())  # a fresh model of the same shape: the next phase's
    assert saved_state_shapes(source[kind]) == {
        name: {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)} for name, p in params.items()
    }
    assert_equal_state(load_saved_state(source[kind], params), source["expected"])
    assert all(float(state["step"]) == 3 for state in source["expected"].values())


@pytest.mark.parametrize("kind", ["single", "distributed"])
def test_mismatched_parameters_are_named(source, kind):
    params = dict(make_model(hidden=7).named_parameters())
    with pytest.raises(ValueError, match=r"10 shapes differ \(e\.g\. \['0\.bias: exp_avg \(6,\) saved, parameter \(7,"):
        load_saved_state(source[kind], params)
    fewer = dict(list(make_model().named_parameters())[:2])  # the first layer only
    with pytest.raises(ValueError, match=r"4 saved parameters are not in this phase's optimizer \(e\.g\. \['1\.bias'"):
        load_saved_state(source[kind], fewer)


def test_a_checkpoint_without_names_or_optimizer_is_refused(source, tmp_path):
    plain = torch.load(source["single"], weights_only=False)
    del plain[PARAM_NAMES_KEY]
    torch.save(plain, tmp_path / "unnamed.ckpt")
    params = dict(make_model().named_parameters())
    with pytest.raises(ValueError, match="does not record its optimizer's parameter names"):
        load_saved_state(tmp_path / "unnamed.ckpt", params)
    torch.save({"state_dict": {}}, tmp_path / "weights_only.ckpt")
    with pytest.raises(ValueError, match="holds 0 optimizer states"):
        load_saved_state(tmp_path / "weights_only.ckpt", params)


def test_sharded_parameters_get_sharded_state(source):
    """FSDP2 parameters (DTensors on a 1-rank gloo mesh): the state of both checkpoint kinds comes back as DTensors
    laid out alike.

    In a spawned process: a process group made in pytest's own process outlives destroy_process_group (the
    device mesh keeps it), and a later test that forks (litdata, DataLoader workers) then hangs in the copied
    group's destructor, which waits for gloo threads the fork did not copy."""
    checkpoints = [source["single"], source["distributed"]]
    mp.start_processes(check_sharded_state, args=(free_port(), checkpoints, source["expected"]), nprocs=1,
                       start_method="spawn")


def check_sharded_state(rank: int, port: int, checkpoints: list[Path], expected: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:
        model = make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        for checkpoint in checkpoints:
            state = load_saved_state(checkpoint, params)
            for name, fields in state.items():
                assert isinstance(fields["exp_avg"], DTensor)
                assert fields["exp_avg"].placements == params[name].placements
            assert_equal_state(state, expected)
    finally:
        dist.destroy_process_group()
