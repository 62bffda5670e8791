"""GPU (NCCL): FSDP2 with the recipe's mixed precision (bf16 compute, fp32 master weights and gradient reduction),
and CPU offload, in real Lightning runs on one CUDA device, against the same run in full fp32.

Each run starts from the same bf16 Hugging Face checkpoint (loaded on the meta device, shard by shard) and trains
4 steps with activation checkpointing; the first step's loss and gathered gradients are recorded.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from prolong_lit.data.collate import collate_samples
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.optim import AdamW, WarmupCosine
from prolong_lit.model.settings import KernelSettings, LlamaSettings

pytestmark = pytest.mark.gpu

SEQ_LEN = 256
ROWS = 16
STEPS = 4
BF16_LOSS_RTOL = 2e-2  # bf16 has an 8-bit mantissa: ~0.4% per rounding, a few percent through the network
BF16_GRAD_RTOL = 5e-2  # |g_bf16 - g_fp32| / |g_fp32| over all gradients together


class StepRecorder(pl.Callback):
    """The dtype/device of the sharded (master) and gathered (compute) weights, every step's loss, and the first
    step's gathered gradients."""

    def __init__(self) -> None:
        self.record: dict = {"losses": []}

    def on_train_start(self, trainer, pl_module) -> None:
        mlp = pl_module.model.model.layers[0].mlp
        master = mlp.gate_proj.weight  # between steps FSDP2 registers the sharded DTensor
        self.record.update(master_dtype=master.dtype, master_device=master.to_local().device.type)

        def capture(module, args) -> None:  # inside FSDP2's pre-forward: the gathered parameter
            self.record.setdefault("compute_dtype", module.gate_proj.weight.dtype)
            self.record.setdefault("compute_device", module.gate_proj.weight.device.type)

        mlp.register_forward_pre_hook(capture)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if "grads" not in self.record:
            params = list(pl_module.model.named_parameters())
            # the sharded gradients' own dtype: `gathered` upcasts its copies to fp32 for the comparisons
            self.record["grad_dtypes"] = {name: p.grad.dtype for name, p in params}
            self.record["grads"] = {name: gathered(p.grad) for name, p in params}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["losses"].append(float(trainer.callback_metrics["train/loss"]))


def gathered(grad) -> torch.Tensor:
    """The full gradient on the CPU; a CPU-offloaded shard goes back to the GPU for NCCL's all-gather."""
    from torch.distributed.tensor import DTensor

    local = grad.to_local()
    if local.device.type == "cpu":
        grad = DTensor.from_local(local.cuda(), grad.device_mesh, grad.placements, shape=grad.shape,
                                  stride=grad.stride())
    return grad.full_tensor().float().cpu()


def packed_rows(vocab: int) -> list[dict[str, np.ndarray]]:
    """ROWS packed rows of SEQ_LEN tokens, 1 to 4 documents each, as `prepare` writes them (in memory: the GPU
    image has no litdata, so the DataModule cannot run there; the collate is the DataModule's own)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(ROWS):
        cuts = np.sort(rng.choice(np.arange(1, SEQ_LEN), size=int(rng.integers(0, 4)), replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [SEQ_LEN]])).astype(np.int32)
        rows.append({"input_ids": rng.integers(0, vocab, SEQ_LEN).astype(np.int32), "doc_lengths": lengths})
    return rows


def loader(vocab: int) -> DataLoader:
    rows = packed_rows(vocab)
    return DataLoader(list(range(ROWS)), batch_size=2, shuffle=False,
                      collate_fn=lambda idx: collate_samples([rows[i] for i in idx], [0] * len(idx), idx))


def fit(model_dir: Path, **sharding) -> dict:
    """`sharding`: FSDP2Strategy's param_dtype / reduce_dtype / cpu_offload."""
    from prolong_lit.parallel.strategy import FSDP2Strategy

    pl.seed_everything(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path=str(model_dir)), seq_len=SEQ_LEN,
                           kernels=KernelSettings(loss_chunk_size=128),
                           optimizer=partial(AdamW, lr=1e-3), scheduler=partial(WarmupCosine, warmup_steps=1))
    recorder = StepRecorder()
    strategy = FSDP2Strategy(activation_checkpointing=True, **sharding)
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, max_steps=STEPS,
                         precision="32-true", gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, train_dataloaders=loader(module.hf_config.vocab_size))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    recorder.record["weights"] = {name: tensor.clone() for name, tensor in weights.items()}
    return recorder.record


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong_lit.model.sizes import size_config_kwargs

    tmp = tmp_path_factory.mktemp("fsdp_gpu")
    torch.manual_seed(1)
    config = LlamaConfig(**{**size_config_kwargs("tiny"), "hidden_size": 256, "intermediate_size": 688,
                            "num_attention_heads": 4, "num_key_value_heads": 2})
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(tmp / "hf"))
    return tmp / "hf", fit(tmp / "hf")  # the full-fp32 sharded run


def relative_grad_error(grads: dict, reference: dict) -> float:
    diff = torch.cat([(grads[n] - g).flatten() for n, g in reference.items()])
    return (diff.norm() / torch.cat([g.flatten() for g in reference.values()]).norm()).item()


def test_bf16_compute_fp32_master_weights_close_to_fp32(setup):
    model_dir, fp32 = setup
    bf16 = fit(model_dir, param_dtype="bfloat16", reduce_dtype="float32")
    assert fp32["compute_dtype"] == torch.float32 and fp32["compute_device"] == "cuda"
    assert bf16["master_dtype"] == torch.float32 and bf16["master_device"] == "cuda"  # AdamW steps fp32 shards
    assert bf16["compute_dtype"] == torch.bfloat16
    assert len(bf16["losses"]) == STEPS and all(torch.isfinite(torch.tensor(bf16["losses"])))
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=BF16_LOSS_RTOL)
    assert relative_grad_error(bf16["grads"], fp32["grads"]) <= BF16_GRAD_RTOL
    assert set(bf16["grad_dtypes"].values()) == {torch.float32}  # gradients reduced into fp32 shards


def test_cpu_offload_keeps_shards_on_the_cpu_and_trains_the_same(setup):
    model_dir, fp32 = setup
    offloaded = fit(model_dir, cpu_offload=True)
    assert offloaded["master_device"] == "cpu"  # still after Lightning moved the module to the GPU
    assert offloaded["compute_device"] == "cuda"
    assert offloaded["losses"] == pytest.approx(fp32["losses"], rel=1e-5)
    assert relative_grad_error(offloaded["grads"], fp32["grads"]) <= 1e-5
    worst = max((offloaded["weights"][n] - w).abs().max().item() for n, w in fp32["weights"].items())
    assert worst <= 1e-5, worst
