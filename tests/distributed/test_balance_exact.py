"""Balanced micro-batches train exactly the same steps: two real 2-rank FSDP runs (CPU, gloo), balancing off and on.

Both runs start from the same Hugging Face checkpoint and train 3 optimizer steps of 2 micro-batches of 1 row on
2 ranks (4 rows of 1-4 documents per step). With `data.balance_micro_batches` the rows of each step go to other
(rank, micro-batch) slots; each step's set of rows is the same, so the logged step losses and the final weights
must agree up to the order of floating-point sums, and the rows must really have moved (else the test shows nothing).

Run as a script (`python test_balance_exact.py SETTINGS_JSON`) this file is one rank of a run; Lightning's
launcher starts the other rank by running the same command again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from prolong_lit.data.datamodule import MixtureDataModule
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.optim import AdamW, WarmupCosine
from prolong_lit.model.settings import LlamaSettings

SEQ_LEN = 64
DOMAINS = {"books": 16, "code": 16}
STEPS = 3
ACCUMULATE = 2
REPO = Path(__file__).resolve().parents[2]
# fp32; the two runs differ in the order of the sums over micro-batches and ranks only
LOSS_RTOL = 1e-6
WEIGHT_ATOL = 1e-6


class Recorder(pl.Callback):
    """Each rank's rows per micro-batch, the logged loss of every step and the gathered final weights."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, list[int]]] = []  # (optimizer step, sample indices) per micro-batch
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.append((trainer.global_step, batch.sample_index.tolist()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.losses):  # this micro-batch ended an optimizer step
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _rank_main(settings: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from prolong_lit.parallel.strategy import FSDP2Strategy

    pl.seed_everything(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path=settings["model_dir"]), seq_len=SEQ_LEN,
                           optimizer=partial(AdamW, lr=1e-3), scheduler=partial(WarmupCosine, warmup_steps=1))
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(activation_checkpointing=False),
        max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0, precision="32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
    )
    data = MixtureDataModule(settings["data_dir"], weights={"books": 1.0, "code": 1.0}, seq_len=SEQ_LEN,
                             micro_batch_size=1, val_samples_per_domain=0, num_workers=0,
                             balance_micro_batches=settings["balance"])
    trainer.fit(module, datamodule=data)
    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rows = [None] * trainer.world_size
    torch.distributed.all_gather_object(rows, recorder.rows)
    if trainer.global_rank == 0:
        torch.save({"rows": rows, "losses": recorder.losses, "weights": weights}, settings["out"])


def run(settings: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, __file__, json.dumps(settings)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(settings["out"], map_location="cpu", weights_only=False)


@pytest.mark.distributed
def test_balanced_fsdp_run_trains_the_same_steps(tmp_path):
    from tests.distributed.test_fsdp import write_hf_checkpoint
    from tests.helpers.data_factory import write_prepared

    write_hf_checkpoint(tmp_path / "hf")
    write_prepared(tmp_path / "data", DOMAINS, seq_len=SEQ_LEN)
    common = {"model_dir": str(tmp_path / "hf"), "data_dir": str(tmp_path / "data")}
    plain = run({**common, "balance": False, "out": str(tmp_path / "plain.pt")})
    balanced = run({**common, "balance": True, "out": str(tmp_path / "balanced.pt")})

    def step_sets(record: dict) -> list[list[int]]:
        sets: list[list[int]] = [[] for _ in range(STEPS)]
        for rank_rows in record["rows"]:
            for step, indices in rank_rows:
                sets[step] += indices
        return [sorted(s) for s in sets]

    assert step_sets(plain) == step_sets(balanced) == [list(range(4 * s, 4 * s + 4)) for s in range(STEPS)]
    assert plain["rows"] != balanced["rows"]  # the deal moved rows between ranks / micro-batches
    assert len(plain["losses"]) == len(balanced["losses"]) == STEPS
    assert balanced["losses"] == pytest.approx(plain["losses"], rel=LOSS_RTOL)
    worst = max((balanced["weights"][n] - w).abs().max().item() for n, w in plain["weights"].items())
    assert worst <= WEIGHT_ATOL, worst


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]))
