"""Sequence parallelism (Ulysses) on 2 and 4 CPU processes (gloo) against P = 1 on the same rows, fp32.

The function-level test drives LongContextLM by hand on P ranks: its parallel plan built from the process group
(`build_plan`, set before `configure_model`), its batch cut (`shard_batch`), forward and chunked loss, and averages
the gradients over the world as DDP does (or lets FSDP2 reduce them); the loss and every parameter's gradient must
equal one process's on the whole rows within 1e-5: documents straddling chunk boundaries, grouped-query heads
(P = 4 repeats the tiny model's 2 kv heads; a 1-kv-head variant repeats 4 times), documents inside chunks (no
exchange at all), activation checkpointing, two data-parallel groups of 2, and FSDP2. The Lightning test trains
2 optimizer steps with FSDP2Strategy on 2 ranks with sequence_parallel_size 2 (both ranks read the same samples)
and must give the single-process run's gradients and weights.

Run as a script (`python test_sequence_parallel.py DATA_DIR OUT`) this file is the 2-rank Lightning job: the
launcher starts rank 1 by running the same command again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.ports import free_port

pytestmark = pytest.mark.distributed

VOCAB = 256
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}  # tiny: 4 query heads, 2 kv heads
SEQ_LEN = 64
STRADDLING = [[10, 30, 24], [64], [5, 1, 50, 8]]  # documents cross every chunk boundary of P = 2 and 4
OTHER_ROWS = [[40, 24], [3, 61], [33, 31]]  # the second data-parallel group's rows
ALIGNED = [[16, 16, 16, 16], [8, 8, 16, 4, 12, 16]]  # each document inside one chunk of 16 (and of 32)
TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[2]  # the launched scripts get it on PYTHONPATH, for tests.helpers.*

CHECKPOINTED = {"activation_checkpointing": True}  # the recomputed forward exchanges again, inside backward
ONE_KV_HEAD = {"overrides": {**OVERRIDES, "num_key_value_heads": 1}}  # P = 4 repeats it 4 times
# (name, P, rows of each data-parallel group, settings (the Llama's overrides, activation checkpointing in the
# parallel plan), FSDP2); world = P * number of groups
SCENARIOS = {
    2: [("straddling", 2, [STRADDLING], {}, False),
        ("inside_chunks", 2, [ALIGNED], {}, False),
        ("checkpointed", 2, [STRADDLING], CHECKPOINTED, False)],
    4: [("straddling_gqa_repeat2", 4, [STRADDLING], {}, False),
        ("straddling_one_kv_head", 4, [STRADDLING], ONE_KV_HEAD, False),
        ("inside_chunks", 4, [ALIGNED], {}, False),
        ("two_groups_of_2", 2, [STRADDLING, OTHER_ROWS], {}, False),
        ("fsdp2", 4, [STRADDLING], {}, True)],
}


def build(settings: dict, plan=None):
    """The module of a scenario, laid out by `plan` (None: one process, whole rows, no checkpointing)."""
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings

    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=settings.get("overrides", OVERRIDES)),
                           seq_len=SEQ_LEN, kernels=KernelSettings(docmask_block_size=16, loss_chunk_size=32))
    if plan is not None:
        module.set_parallel_plan(plan)
    module.configure_model()  # sharded with FSDP2 when the plan has a shard mesh
    return module


def rows_batch(rows: list[list[int]], seed: int, step_loss_tokens: int | None = None):
    from tests.helpers.model_batches import make_packed_batch

    return make_packed_batch(rows, vocab=VOCAB, seed=seed, step_loss_tokens=step_loss_tokens)


def group_batches(groups: list[list[list[int]]]) -> list:
    """One micro-batch (PackedBatch) per data-parallel group; step_loss_tokens counts all groups' tokens once."""
    batches = [rows_batch(rows, seed=g) for g, rows in enumerate(groups)]
    total = sum(int(b.loss_tokens) for b in batches)
    return [rows_batch(rows, seed=g, step_loss_tokens=total) for g, rows in enumerate(groups)]


def reference(groups: list[list[list[int]]], settings: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """P = 1, one process, every group's rows: the step's token-mean loss and its gradients."""
    from prolong_lit.parallel.plan import ParallelPlan

    checkpointed = settings.get("activation_checkpointing", False)
    module = build(settings, ParallelPlan(activation_checkpointing=True) if checkpointed else None)
    batches = group_batches(groups)
    loss = sum(module.compute_loss_sum(b)[0] for b in batches) / int(batches[0].step_loss_tokens)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in module.model.named_parameters()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.tensor import DTensor

    from prolong_lit.model.sequence_batch import shard_batch
    from prolong_lit.parallel.fsdp import ShardingConfig
    from prolong_lit.parallel.plan import build_plan
    from prolong_lit.parallel.ulysses import ALL_TO_ALL_STATS

    for name, size, groups, settings, fsdp in SCENARIOS[world]:
        plan = build_plan("cpu", rank, world, replicate_size=1, sequence_parallel_size=size,
                          sharding=ShardingConfig() if fsdp else None,
                          activation_checkpointing=settings.get("activation_checkpointing", False))
        module = build(settings, plan)
        assert (plan.shard_mesh is not None) == fsdp and plan.sequence_parallel_size == size
        batch = shard_batch(group_batches(groups)[plan.data_parallel_rank], plan.sequence_parallel)
        ALL_TO_ALL_STATS.reset()
        loss_sum, _ = module.compute_loss_sum(batch)
        step_tokens = int(batch.step_loss_tokens)
        # LongContextLM.training_step's scale: the world size (gradient_average_size), since DDP/FSDP average
        # over every rank while the ranks of a group hold different tokens of the same rows
        (loss_sum / step_tokens * world).backward()
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        grads = {}
        for param_name, param in module.model.named_parameters():
            grad = param.grad
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()  # FSDP2 already averaged over the world
            else:
                grad = grad.clone()
                dist.all_reduce(grad)
                grad /= world  # what DDP does
            grads[param_name] = grad
        if rank == 0:
            torch.save({"loss": total.item() / step_tokens, "grads": grads, "exchanges": ALL_TO_ALL_STATS.calls},
                       Path(out_dir) / f"{name}.pt")
    # a DataModule that gives the ranks of a group different rows is caught before any attention runs
    sp = build_plan("cpu", rank, world, sequence_parallel_size=world, sharding=None).sequence_parallel
    try:
        shard_batch(rows_batch(STRADDLING, seed=rank), sp)
        caught = ""
    except RuntimeError as error:
        caught = str(error)
    (Path(out_dir) / f"mismatch{rank}.txt").write_text(caught)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_loss_and_gradients_equal_one_rank(world, tmp_path):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    layers = 2
    for name, _, groups, settings, _ in SCENARIOS[world]:
        got = torch.load(tmp_path / f"{name}.pt")
        loss, grads = reference(groups, settings)
        assert abs(got["loss"] - loss) <= TOLERANCE, (name, got["loss"], loss)
        assert got["grads"].keys() == grads.keys()
        diffs = {k: (got["grads"][k] - grads[k]).abs().max().item() for k in grads}
        assert max(diffs.values()) <= TOLERANCE, (name, diffs)
        assert max(g.abs().max().item() for g in grads.values()) > 1e-3  # gradients that could have differed
        # per layer: q/k/v and output exchanges, forward and backward (and the recomputed forward when
        # checkpointed); none when no document crosses a chunk boundary
        expected = 0 if name == "inside_chunks" else (6 if settings is CHECKPOINTED else 4) * layers
        assert got["exchanges"] == expected, name
    for rank in range(world):
        assert "got different micro-batches" in (tmp_path / f"mismatch{rank}.txt").read_text()


# -- Lightning: FSDP2Strategy, 2 ranks, sequence_parallel_size 2, against one process ------------------------

MICRO_BATCH, ACCUMULATE, STEPS = 2, 2, 2


def lightning_fit(data_dir: Path, **trainer_kwargs) -> tuple:
    import lightning.pytorch as pl

    from prolong_lit.data.datamodule import MixtureDataModule
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.optim import AdamW, WarmupCosine
    from prolong_lit.model.settings import KernelSettings, LlamaSettings

    class Record(pl.Callback):
        """Every step's gradients (gathered under FSDP2), the initial weights, every row each rank trained on."""

        def __init__(self) -> None:
            self.grads: list[dict[str, torch.Tensor]] = []
            self.samples: list[int] = []
            self.initial: dict[str, torch.Tensor] = {}

        def on_train_start(self, trainer, module) -> None:
            self.initial = full_weights(module)

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.samples += batch.sample_index.tolist()

        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            from torch.distributed.tensor import DTensor

            grads = {}
            for name, param in module.model.named_parameters():
                grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
                grads[name] = grad.detach().clone()
            self.grads.append(grads)

    pl.seed_everything(0)
    from tests.helpers.data_factory import VOCAB_SIZE

    overrides = {**OVERRIDES, "vocab_size": VOCAB_SIZE}  # the test data's token ids
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=overrides), seq_len=SEQ_LEN,
                           kernels=KernelSettings(loss_chunk_size=32), optimizer=partial(AdamW, lr=1e-4),
                           scheduler=partial(WarmupCosine, warmup_steps=0))
    data = MixtureDataModule(str(data_dir), weights={"books": 1.0, "code": 1.0}, seq_len=SEQ_LEN,
                             micro_batch_size=MICRO_BATCH, val_samples_per_domain=0, num_workers=0)
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, precision="32-true", callbacks=[record], **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer, module, record


def full_weights(module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    state = module.model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


def _lightning_run(data_dir: Path, out: Path) -> None:
    """One rank of the 2-process job; rank 0 saves what it trained on, the first gradients and the weights."""
    torch.set_num_threads(1)
    from prolong_lit.parallel.strategy import FSDP2Strategy

    trainer, module, record = lightning_fit(data_dir, devices=2, strategy=FSDP2Strategy(sequence_parallel_size=2))
    weights = full_weights(module)
    torch.save({"samples": record.samples, "grads": record.grads, "weights": weights},
               out / f"rank{trainer.global_rank}.pt")


def test_lightning_fsdp2_with_sequence_parallel_trains_like_one_process(tmp_path):
    from tests.helpers.data_factory import write_prepared

    data_dir = tmp_path / "prepared"
    write_prepared(data_dir, {"books": 12, "code": 12}, seq_len=SEQ_LEN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, __file__, str(data_dir), str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    _, module, record = lightning_fit(data_dir, devices=1)
    # both ranks of the group read exactly the single process's samples: the whole step, not half of it each
    assert ranks[0]["samples"] == ranks[1]["samples"] == record.samples
    assert len(record.samples) == STEPS * ACCUMULATE * MICRO_BATCH
    assert len(ranks[0]["grads"]) == len(record.grads) == STEPS
    for step, (got, want) in enumerate(zip(ranks[0]["grads"], record.grads)):
        grad_diff = max((got[k] - g).abs().max().item() for k, g in want.items())
        assert grad_diff <= TOLERANCE, (step, grad_diff)
    weights = full_weights(module)
    weight_diff = max((ranks[0]["weights"][k] - w).abs().max().item() for k, w in weights.items())
    assert weight_diff <= TOLERANCE, weight_diff
    moved = max((w - record.initial[k]).abs().max().item() for k, w in weights.items())
    assert moved > 1e-5  # the steps changed the weights (AdamW, lr 1e-4: ~1e-4 per element and step)


if __name__ == "__main__":
    _lightning_run(Path(sys.argv[1]), Path(sys.argv[2]))
