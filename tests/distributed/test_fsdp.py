"""FSDP2 and HSDP sharding in real multi-process Lightning runs (CPU, gloo), checked against one process.

The runs start from a Hugging Face checkpoint written here (bf16 safetensors in two files, as Meta ships Llama-3),
loaded on the meta device and filled shard by shard:

    A  2 ranks, FSDP (mesh 1x2), activation checkpointing, loss chunks of 16 tokens: 2 steps of 4 samples,
       then a distributed checkpoint
    B  4 ranks, HSDP (mesh 2x2), 2 micro-batches per step: resumes A's checkpoint, 1 step of 16 samples, saves
    C  1 rank, 2 micro-batches of 8 rows per step: resumes A's checkpoint, 1 step of the same 16 samples

The first step of each run (loss and every gradient, gathered) is compared with a single process computing the
token-mean loss of the same global batch with an unsharded model, no activation checkpointing and one loss chunk.

Run as a script (`python test_fsdp.py SETTINGS_JSON`) this file is one rank of a run; Lightning's launcher starts
the other ranks by running the same command again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from prolong_lit.data.datamodule import MixtureDataModule
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.optim import AdamW, WarmupCosine
from prolong_lit.model.settings import KernelSettings, LlamaSettings

log = logging.getLogger(__name__)

SEQ_LEN = 64
DOMAINS = {"books": 16, "code": 16}
MICRO_BATCH = 2
MAX_STEPS = 3  # the same schedule in every run: A stops after 2, B and C resume for the third
REPO = Path(__file__).resolve().parents[2]  # the launched scripts get it on PYTHONPATH, for tests.helpers.*
# fp32 everywhere: sharded and single-process sums differ only in reduction order
LOSS_RTOL = 1e-6
GRAD_TOL = 1e-5  # max |difference| / max |gradient|, per parameter


# -- the rank script ---------------------------------------------------------------------------------------------


def build_data(data_dir: str | Path, micro_batch: int) -> MixtureDataModule:
    return MixtureDataModule(str(data_dir), weights={"books": 1.0, "code": 1.0}, seq_len=SEQ_LEN,
                             micro_batch_size=micro_batch, val_samples_per_domain=0, num_workers=0)


def full_state(module: LongContextLM, optimizer: torch.optim.Optimizer) -> dict:
    """The gathered weights (and optimizer state) of the sharded Llama; complete on rank 0 only (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"weights": get_model_state_dict(module.model, options=options), "optimizer": {}}
    # an empty optimizer state would be initialised by a zero-gradient step (counted in AdamW's `step`)
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(module.model, optimizer, options=options).get("state", {})
    # copies: on one rank (and for AdamW's `step`) the "full" tensors are the live ones, changed by later steps
    return _cloned(state)


def _cloned(value):
    if isinstance(value, dict):
        return {key: _cloned(item) for key, item in value.items()}
    return value.clone() if isinstance(value, torch.Tensor) else value


class Recorder(pl.Callback):
    """Writes (rank 0) what the test checks: the sharding, the state at start, the first step's samples, loss
    and gathered pre-clip gradients; stops the run after `stop_at` steps."""

    def __init__(self, stop_at: int | None) -> None:
        self.stop_at = stop_at
        self.record: dict = {}
        self.samples: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        params = dict(pl_module.model.named_parameters())
        mesh = params["model.embed_tokens.weight"].device_mesh
        local = torch.tensor(sum(p.to_local().numel() for p in params.values() if isinstance(p, DTensor)))
        self.record.update(
            start_step=trainer.global_step,
            all_dtensor=all(isinstance(p, DTensor) for p in params.values()),
            placements={name: str(p.placements) for name, p in params.items() if isinstance(p, DTensor)},
            mesh=(mesh.mesh_dim_names, tuple(mesh.shape)),
            total_numel=sum(p.numel() for p in params.values()),
            local_numel=trainer.strategy.all_gather(local).tolist(),
            start=full_state(pl_module, trainer.optimizers[0]),
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.record["start_step"]:
            self.samples += batch.sample_index.tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != self.record["start_step"]:
            return
        self.record["grads"] = {name: p.grad.full_tensor().cpu() for name, p in pl_module.model.named_parameters()}
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, self.samples)
        self.record["samples"] = sorted(i for rank in gathered for i in rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.record["start_step"] + 1 and "loss" not in self.record:
            self.record["loss"] = float(trainer.callback_metrics["train/loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def _rank_main(settings: dict) -> None:
    """One rank of a run described by `settings` (see RUNS)."""
    from prolong_lit.parallel.strategy import FSDP2Strategy

    pl.seed_everything(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path=settings["model_dir"]), seq_len=SEQ_LEN,
                           kernels=KernelSettings(loss_chunk_size=settings["loss_chunk_size"]),
                           optimizer=partial(AdamW, lr=1e-3), scheduler=partial(WarmupCosine, warmup_steps=1))
    strategy = FSDP2Strategy(replicate_size=settings["replicate"],
                             activation_checkpointing=settings["activation_checkpointing"])
    recorder = Recorder(settings.get("stop_at"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=settings["devices"], strategy=strategy,
        max_steps=MAX_STEPS, accumulate_grad_batches=settings["accumulate"], gradient_clip_val=1.0,
        precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
    )
    data = build_data(settings["data_dir"], settings.get("micro_batch", MICRO_BATCH))
    trainer.fit(module, datamodule=data, ckpt_path=settings.get("resume"))
    if settings.get("save"):
        trainer.save_checkpoint(settings["save"])
    recorder.record["end"] = full_state(module, trainer.optimizers[0])
    if trainer.global_rank == 0:
        torch.save(recorder.record, settings["out"])


# -- the test process --------------------------------------------------------------------------------------------


RUNS = {
    "A": {"devices": 2, "replicate": 1, "accumulate": 1, "activation_checkpointing": True, "loss_chunk_size": 16,
          "stop_at": 2, "save": "ckpt_A"},
    "B": {"devices": 4, "replicate": 2, "accumulate": 2, "activation_checkpointing": True, "loss_chunk_size": 48,
          "resume": "ckpt_A", "save": "ckpt_B"},
    "C": {"devices": 1, "replicate": 1, "accumulate": 2, "micro_batch": 8, "activation_checkpointing": False,
          "loss_chunk_size": 2048, "resume": "ckpt_A"},
}


def write_hf_checkpoint(path: Path) -> None:
    """A tiny Llama-3-shaped model as Meta ships one: bf16 safetensors split over two files (+ the index).
    intermediate_size 171 shards unevenly: 86 + 85 rows of gate_proj / up_proj over 2 ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong_lit.model.sizes import size_config_kwargs

    torch.manual_seed(1)
    config = LlamaConfig(**{**size_config_kwargs("tiny"), "intermediate_size": 171, "max_position_embeddings": 4096})
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(path), max_shard_size="20MB")


def run(settings: dict, tmp: Path) -> dict:
    settings = {**settings, "out": str(tmp / f"{settings['name']}.pt")}
    for key in ("resume", "save"):
        if settings.get(key):
            settings[key] = str(tmp / settings[key])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, __file__, json.dumps(settings)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(settings["out"], map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from tests.helpers.data_factory import write_prepared

    tmp = tmp_path_factory.mktemp("fsdp")
    write_hf_checkpoint(tmp / "hf")
    write_prepared(tmp / "data", DOMAINS, seq_len=SEQ_LEN)
    common = {"model_dir": str(tmp / "hf"), "data_dir": str(tmp / "data")}
    records = {name: run({**common, **settings, "name": name}, tmp) for name, settings in RUNS.items()}
    return {"tmp": tmp, **records}


def reference_step(model_dir: Path, data_dir: Path, weights: dict | None, start: int, samples: int):
    """(token-mean loss, gradients) of one process, unsharded, on the global batch [start, start + samples)."""
    module = LongContextLM(llama=LlamaSettings(name_or_path=str(model_dir)), seq_len=SEQ_LEN)
    module.configure_model()
    if weights is not None:
        module.model.load_state_dict(weights)
    data = build_data(data_dir, samples)
    data.setup("fit")
    data.load_state_dict({**data.state_dict(), "consumed_samples": start})
    batch = data.train_stream(rank=0, world_size=1).micro_batch(0)
    assert batch.sample_index.tolist() == list(range(start, start + samples))
    loss_sum, count = module.compute_loss_sum(batch)
    assert count == batch.step_loss_tokens  # one micro-batch holds the whole step
    loss = loss_sum / count
    loss.backward()
    return loss.item(), {name: p.grad for name, p in module.model.named_parameters()}


def assert_step_matches(record: dict, reference: tuple[float, dict]) -> float:
    """The run's first-step loss and gradients equal the reference's; returns the worst relative gradient diff."""
    loss, grads = reference
    assert record["loss"] == pytest.approx(loss, rel=LOSS_RTOL)
    assert record["grads"].keys() == grads.keys()
    worst = 0.0
    for name, grad in grads.items():
        diff = (record["grads"][name] - grad).abs().max().item() / grad.abs().max().item()
        assert diff <= GRAD_TOL, (name, diff)
        worst = max(worst, diff)
    return worst


def assert_equal_states(loaded: dict, saved: dict) -> None:
    assert loaded["weights"].keys() == saved["weights"].keys()
    for name, tensor in saved["weights"].items():
        assert torch.equal(loaded["weights"][name], tensor), name
    assert loaded["optimizer"].keys() == saved["optimizer"].keys() and saved["optimizer"]
    for name, moments in saved["optimizer"].items():
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(loaded["optimizer"][name][key]), torch.as_tensor(value)), (name, key)


@pytest.mark.distributed
def test_fsdp_two_ranks_shards_and_matches_one_process(runs):
    a = runs["A"]
    assert a["mesh"] == (("shard",), (2,)) and a["all_dtensor"]
    assert set(a["placements"].values()) == {"(Shard(dim=0),)"}
    assert sum(a["local_numel"]) == a["total_numel"] and max(a["local_numel"]) <= a["total_numel"] // 2 + 1000
    assert a["samples"] == list(range(4))
    # started from the checkpoint (bf16 on disk, fp32 in training), the same init as from_pretrained
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(runs["tmp"] / "hf"), dtype=torch.float32).state_dict()
    assert all(torch.equal(a["start"]["weights"][name], hf[name]) for name in hf)
    worst = assert_step_matches(a, reference_step(runs["tmp"] / "hf", runs["tmp"] / "data", None, 0, 4))
    log.info("FSDP 2 ranks: worst relative gradient difference %.2e", worst)


@pytest.fixture(scope="module")
def resumed_reference(runs) -> tuple[float, dict]:
    """One process's third step (samples 8..15) from run A's final weights: what every resumed run must do."""
    return reference_step(runs["tmp"] / "hf", runs["tmp"] / "data", runs["A"]["end"]["weights"], 8, 16)


@pytest.mark.distributed
def test_hsdp_four_ranks_resumes_a_two_rank_checkpoint_and_matches_one_process(runs, resumed_reference):
    a, b = runs["A"], runs["B"]
    assert b["mesh"] == (("replicate", "shard"), (2, 2)) and b["all_dtensor"]
    assert set(b["placements"].values()) == {"(Replicate(), Shard(dim=0))"}
    assert b["start_step"] == 2
    assert_equal_states(b["start"], a["end"])  # weights and AdamW moments, resharded 2 -> 2x2
    assert b["samples"] == list(range(8, 24))  # the stream continues where A stopped (2 steps x 4 samples)
    worst = assert_step_matches(b, resumed_reference)
    log.info("HSDP 2x2: worst relative gradient difference %.2e", worst)


@pytest.mark.distributed
def test_one_rank_resumes_a_two_rank_checkpoint_and_agrees_with_four(runs, resumed_reference):
    a, b, c = runs["A"], runs["B"], runs["C"]
    assert c["start_step"] == 2 and c["mesh"] == (("shard",), (1,))
    assert_equal_states(c["start"], a["end"])
    assert c["samples"] == list(range(8, 24))
    assert_step_matches(c, resumed_reference)
    # the same third step on 1 rank and on 4 (HSDP): the same AdamW update from the restored moments
    worst = max((c["end"]["weights"][n] - w).abs().max().item() for n, w in b["end"]["weights"].items())
    assert worst <= 1e-6, worst
    log.info("1 rank vs HSDP 2x2 after the resumed step: max weight difference %.2e", worst)


@pytest.mark.distributed
def test_hsdp_checkpoint_exports_consolidated(runs, llama3_tokenizer_dir):
    from prolong_lit.checkpoint import export_hf

    checkpoint = runs["tmp"] / "ckpt_B"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    out = export_hf(checkpoint, runs["tmp"] / "export", tokenizer=str(llama3_tokenizer_dir), dtype="float32")
    weights = load_file(str(out / "model.safetensors"))
    expected = runs["B"]["end"]["weights"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())


def test_eval_command_reads_the_distributed_checkpoint_as_its_export(runs, llama3_tokenizer_dir, tmp_path):
    """`eval` on the 4-rank distributed checkpoint and on a Hugging Face export of it (transformers'
    from_pretrained): the same prompts, generations and scores."""
    from prolong_lit.checkpoint import export_hf
    from prolong_lit.commands.eval import evaluate

    checkpoint = runs["tmp"] / "ckpt_B"
    hf_dir = export_hf(checkpoint, tmp_path / "hf", tokenizer=str(llama3_tokenizer_dir), dtype="float32")
    flags = ["--tokenizer", str(llama3_tokenizer_dir), "--tasks", "ruler_niah_s_1", "--lengths", "256",
             "--depths", "0.5", "--samples_per_task", "2", "--max_new_tokens", "6", "--device", "cpu"]
    from_checkpoint = evaluate(["--model", str(checkpoint), "--output", str(tmp_path / "a"), *flags])
    from_export = evaluate(["--model", str(hf_dir), "--output", str(tmp_path / "b"), *flags])
    assert [r["output"] for r in from_checkpoint.records] == [r["output"] for r in from_export.records]
    assert [r["prompt_tokens"] for r in from_checkpoint.records] == [r["prompt_tokens"] for r in from_export.records]
    assert from_checkpoint.flat() == from_export.flat()


# -- settings and loading, in this process ------------------------------------------------------------------------


def test_bad_sharding_settings_name_the_setting():
    from prolong_lit.model.parallelize import shard_llama
    from prolong_lit.parallel.fsdp import ShardingConfig
    from prolong_lit.parallel.plan import build_world_mesh
    from prolong_lit.parallel.strategy import FSDP2Strategy

    with pytest.raises(ValueError, match=r"trainer.strategy.init_args.param_dtype: 'bf16' is not one of bfloat16"):
        FSDP2Strategy(param_dtype="bf16")
    with pytest.raises(ValueError, match=r"trainer.strategy.init_args.reduce_dtype: 'fp32'"):
        ShardingConfig(reduce_dtype="fp32")
    with pytest.raises(ValueError, match=r"replicate_size: 0 is neither a positive integer nor 'nodes'"):
        FSDP2Strategy(replicate_size=0)
    with pytest.raises(ValueError, match=r"replicate_size: 3 does not divide the world size 4"):
        build_world_mesh("cpu", world_size=4, replicate_size=3)
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"model.llama.name_or_path: .*tied input/output embeddings .* without a "
                                         r"sharding strategy"):
        shard_llama(LlamaForCausalLM(tied), mesh=None, config=ShardingConfig())


def test_slice_loading_equals_from_pretrained_and_checks_shapes(tmp_path):
    """The loader into plain (unsharded) parameters: the same fp32 weights as transformers' from_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong_lit.model.weights import load_hf_weights

    write_hf_checkpoint(tmp_path / "hf")
    expected = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).state_dict()
    config = LlamaConfig.from_pretrained(str(tmp_path / "hf"))
    model = LlamaForCausalLM(config)  # fp32, random: every weight must be overwritten
    read = load_hf_weights(model, tmp_path / "hf")
    assert read == sum(p.numel() for p in model.parameters())
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in expected.items())

    config.intermediate_size = 172
    shapes = r"model.llama.name_or_path: model.layers.0.mlp.\w+_proj.weight is \(\d+, \d+\) in"
    with pytest.raises(ValueError, match=shapes):
        load_hf_weights(LlamaForCausalLM(config), tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model.llama.name_or_path: .* holds no model.safetensors"):
        load_hf_weights(model, tmp_path / "empty")


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]))
