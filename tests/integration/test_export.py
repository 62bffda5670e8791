"""`export`: real Lightning checkpoints (a single file from a 2-step fit, and a distributed checkpoint written by a
real 2-process FSDP2 ModelParallelStrategy run over gloo) -> a Hugging Face directory that plain transformers loads,
giving the module's logits (fp32, <= 1e-5), with the trained rope_theta / max_position_embeddings.

Run as a script (`python test_export.py DATA_DIR CHECKPOINT REFERENCE`) this file is the 2-rank training job:
Lightning's launcher starts rank 1 by running the same command again.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from prolong_lit.checkpoint import export_hf, load_checkpoint_state
from prolong_lit.commands.export import main
from prolong_lit.data.datamodule import MixtureDataModule
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.optim import AdamW
from prolong_lit.model.settings import LlamaSettings

SEQ_LEN = 64
DOMAINS = {"books": 10, "code": 10}
ROPE_THETA = 8e6  # not tiny's 5e5: the export must carry the trained value
MAX_POSITIONS = 4096  # not tiny's 8192
REPO = Path(__file__).resolve().parents[2]  # the launched scripts get it on PYTHONPATH, for tests.helpers.*


def build_module(cls: type[LongContextLM] = LongContextLM) -> LongContextLM:
    llama = LlamaSettings(name_or_path="tiny", rope_theta=ROPE_THETA, max_position_embeddings=MAX_POSITIONS)
    return cls(llama=llama, seq_len=SEQ_LEN, optimizer=functools.partial(AdamW, lr=3e-3))


def build_data(data_dir: Path) -> MixtureDataModule:
    return MixtureDataModule(str(data_dir), weights={"books": 1.0, "code": 1.0}, seq_len=SEQ_LEN,
                             micro_batch_size=2, val_samples_per_domain=0, num_workers=0)


def fit(module: LongContextLM, data_dir: Path, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, precision="32-true", **trainer_kwargs)
    trainer.fit(module, datamodule=build_data(data_dir))
    return trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from tests.helpers.data_factory import write_prepared

    path = tmp_path_factory.mktemp("prepared")
    write_prepared(path, DOMAINS, seq_len=SEQ_LEN)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> tuple[LongContextLM, Path]:
    """A tiny LongContextLM after a real 2-step fit, and the single-file checkpoint the Trainer saved of it."""
    module = build_module()
    trainer = fit(module, data_dir)
    checkpoint = tmp_path_factory.mktemp("run") / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    return module.eval(), checkpoint


def documents(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document of a packed micro-batch, from its cu_seq_lens."""
    length = batch.input_ids.shape[1]
    bounds = batch.cu_seq_lens.tolist()
    return [(start // length, start % length, start % length + end - start) for start, end in zip(bounds, bounds[1:])]


def test_round_trip_gives_the_module_logits_and_the_trained_rope(
    trained, data_dir, tmp_path, llama3_tokenizer_dir, llama3_tokenizer
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module, checkpoint = trained
    out = tmp_path / "hf"
    main(["--checkpoint", str(checkpoint), "--output", str(out), "--tokenizer", str(llama3_tokenizer_dir),
          "--dtype", "float32"])

    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert "prolong" not in (out / "config.json").read_text()  # no attention name only prolong_lit registers
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_theta"] == ROPE_THETA
    assert hf.config.max_position_embeddings == MAX_POSITIONS
    assert hf.config.use_cache is True and hf.config._attn_implementation == "sdpa"

    # A packed micro-batch of the run's own data: the module runs it packed (documents isolated by its attention),
    # transformers runs every document alone.
    stream = build_data(data_dir).train_stream(rank=0, world_size=1)
    batch = next(b for b in map(stream.micro_batch, range(20)) if len(documents(b)) > 2)  # several docs in a row
    docs = documents(batch)
    with torch.no_grad():
        packed = module.model.lm_head(module(batch))  # (B, L, V)
        diffs = []
        for row, start, end in docs:
            alone = hf(input_ids=batch.input_ids[row : row + 1, start:end]).logits[0]  # (n, V)
            diffs.append((alone - packed[row, start:end]).abs().max().item())
    assert max(diffs) <= 1e-5, diffs
    assert packed.std() > 0.1  # logits of a real model, not a degenerate all-equal output

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "ProLong: long-context training <|eot_id|> done."
    assert tokenizer(text)["input_ids"] == llama3_tokenizer(text)["input_ids"]
    assert len(tokenizer) == 128_256 and tokenizer.eos_token == "<|eot_id|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]


def test_default_bfloat16_and_overwrite_replaces_an_export(trained, tmp_path, llama3_tokenizer_dir):
    module, checkpoint = trained
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export, as far as --overwrite is concerned
    (out / "stale.txt").write_text("from the old export")
    export_hf(checkpoint, out, tokenizer=str(llama3_tokenizer_dir), overwrite=True)  # default dtype

    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_file(str(out / "model.safetensors"))
    expected = module.model.state_dict()
    assert weights.keys() == expected.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_bad_settings_fail_before_anything_is_written(trained, tmp_path, llama3_tokenizer_dir):
    _, checkpoint = trained
    tokenizer = str(llama3_tokenizer_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"--output: .* not empty; pass --overwrite"):
        export_hf(checkpoint, busy, tokenizer=tokenizer)
    with pytest.raises(FileExistsError, match=r"--output: .* not a Hugging Face model directory"):
        export_hf(checkpoint, busy, tokenizer=tokenizer, overwrite=True)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"--checkpoint: .*missing\.ckpt' does not exist"):
        export_hf(tmp_path / "missing.ckpt", out, tokenizer=tokenizer)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"model.model.norm.weight": torch.ones(4)}}, foreign)
    with pytest.raises(ValueError, match=r"--checkpoint: .* is not a prolong_lit checkpoint"):
        export_hf(foreign, out, tokenizer=tokenizer)
    # without --tokenizer the export uses the one the run recorded: the test data's made-up name 'test'
    assert torch.load(checkpoint, weights_only=False)["tokenizer"] == "test"
    with pytest.raises(FileNotFoundError, match=r"--tokenizer: tokenizer directory 'test' does not exist"):
        export_hf(checkpoint, out)
    without_tokenizer = tmp_path / "no_tokenizer.ckpt"
    torch.save({k: v for k, v in torch.load(checkpoint, weights_only=False).items() if k != "tokenizer"},
               without_tokenizer)
    with pytest.raises(ValueError, match=r"--tokenizer: the checkpoint .* does not record its tokenizer"):
        export_hf(without_tokenizer, out)
    with pytest.raises(ValueError, match=r"--dtype: 'int8'"):
        export_hf(checkpoint, out, tokenizer=tokenizer, dtype="int8")
    assert not out.exists()


@pytest.mark.distributed
def test_distributed_checkpoint_exports_consolidated(data_dir, tmp_path, llama3_tokenizer_dir):
    """Two ranks train the tiny model sharded with FSDP2 and save a torch.distributed.checkpoint directory; the
    export (one process, no process group) holds exactly the full weights the ranks gathered themselves."""
    checkpoint, reference = tmp_path / "dcp", tmp_path / "reference.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, str(data_dir), str(checkpoint), str(reference)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # sharded

    full = torch.load(reference, map_location="cpu")
    hf_config, state = load_checkpoint_state(checkpoint)
    assert hf_config["rope_parameters"]["rope_theta"] == ROPE_THETA
    assert state.keys() == full.keys()

    out = export_hf(checkpoint, tmp_path / "hf", tokenizer=str(llama3_tokenizer_dir), dtype="float32")
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == full.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, full[name]), name
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == MAX_POSITIONS


def _sharded_run(data_dir: Path, checkpoint: Path, reference: Path) -> None:
    """One rank of the 2-process job: fit 2 steps, save the distributed checkpoint, rank 0 saves the full weights."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    pl.seed_everything(0)
    module = build_module()  # configure_model shards it with FSDP2 under the strategy's device mesh
    # Both ranks data-parallel: the strategy's "auto" sizes put one node's devices all into tensor parallelism,
    # leaving a data_parallel mesh of 1 (every rank an unsynchronised full replica).
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = fit(module, data_dir, devices=2, strategy=strategy)
    trainer.save_checkpoint(checkpoint)
    full = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in module.model.state_dict().items()}
    assert any(isinstance(t, DTensor) for t in module.model.state_dict().values())
    if trainer.global_rank == 0:
        torch.save({name: t.detach().cpu().clone() for name, t in full.items()}, reference)


if __name__ == "__main__":
    _sharded_run(*(Path(arg) for arg in sys.argv[1:4]))
