"""The LightningModule: sizes and config overrides, the exact step-mean loss under gradient accumulation (real
Trainer runs against transformers' eager Llama), validation loss, LR schedule, parameter groups, and the errors."""

from __future__ import annotations

import copy
import functools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from prolong_lit.data.format import DomainStats, Manifest, PackedBatch
from prolong_lit.model.config import build_llama_config
from prolong_lit.model.module import LongContextLM, check_manifest
from prolong_lit.model.optim import AdamW, WarmupCosine, class_path_of, param_groups, warmup_cosine
from prolong_lit.model.settings import KernelSettings, LlamaSettings
from prolong_lit.parallel.plan import ParallelPlan
from tests.helpers.model_batches import concat_rows, make_packed_batch, share_step
from tests.helpers.tiny_model import OVERRIDES, VOCAB, eager_copy

SGD_LR = 0.5


class SGDModule(LongContextLM):
    """Plain SGD, so a parameter update is exactly -lr * gradient (AdamW's first step would hide the scale)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=SGD_LR)


class GradCapture(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {name: p.grad.clone() for name, p in pl_module.model.named_parameters()}


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    precision="32-true")
    return pl.Trainer(**{**defaults, **kwargs})


def loader(batches):
    return DataLoader(batches, batch_size=None)


# -- sizes and config ------------------------------------------------------------------------------------------


def test_unknown_size_names_the_setting_and_the_sizes():
    with pytest.raises(ValueError, match=r"model\.llama\.name_or_path: 'llama3-70b'.*llama3-8b, tiny"):
        LongContextLM(llama=LlamaSettings(name_or_path="llama3-70b"))


def test_llama3_8b_is_the_real_architecture():
    config = build_llama_config("llama3-8b")
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert params == 8_030_261_248  # Meta-Llama-3-8B
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size, config.tie_word_embeddings) == (32, 32, 8, 128, 128256, False)
    assert config.rope_parameters == {"rope_theta": 500000.0, "rope_type": "default"}


def test_overrides_are_written_into_the_hf_config():
    config = build_llama_config("tiny", {"num_hidden_layers": 3}, rope_theta=8e6, max_position_embeddings=65536)
    assert config.rope_parameters == {"rope_theta": 8e6, "rope_type": "default"}
    assert (config.num_hidden_layers, config.max_position_embeddings, config.use_cache) == (3, 65536, False)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    scaled = build_llama_config("tiny", rope_scaling=scaling, max_position_embeddings=131072)
    assert scaled.rope_parameters == {"rope_theta": 500000.0, **scaling}
    with pytest.raises(ValueError, match=r"model\.llama\.overrides: 'hiden_size' is not a LlamaConfig field"):
        build_llama_config("tiny", {"hiden_size": 32})
    with pytest.raises(ValueError, match=r"model\.llama\.rope_theta"):
        build_llama_config("tiny", {"rope_theta": 1e6})


def test_checkpoint_directory_loads_weights_as_they_are(tmp_path):
    torch.manual_seed(0)
    source = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES))
    source.configure_model()
    source.model.save_pretrained(tmp_path / "hf")
    module = LongContextLM(
        llama=LlamaSettings(name_or_path=str(tmp_path / "hf"), rope_theta=8e6, max_position_embeddings=65536),
        kernels=KernelSettings(attn_implementation="docmask"),
    )
    module.configure_model()
    assert module.model.config.rope_parameters["rope_theta"] == 8e6
    assert module.model.config.max_position_embeddings == 65536
    assert module.model.config._attn_implementation == "prolong_docmask"
    loaded, saved = module.model.state_dict(), source.model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_max_position_embeddings_must_cover_seq_len():
    with pytest.raises(ValueError,
                       match=r"model\.llama\.max_position_embeddings \(8192\) must be >= the training length \(65536"):
        LongContextLM(llama=LlamaSettings(name_or_path="tiny"), seq_len=65536)


# -- schedule and parameter groups -----------------------------------------------------------------------------


def test_warmup_cosine_values():
    factor = warmup_cosine(warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert factor(0) == 0.0  # Hugging Face's warmup: the first step runs at lr 0
    assert factor(5) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(1.0)  # warmup end = peak
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert factor(100) == pytest.approx(0.1)  # the floor, min_lr_ratio


def test_optimizer_lr_follows_schedule_and_groups_skip_norms():
    torch.manual_seed(0)
    module = LongContextLM(
        llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
        optimizer=functools.partial(AdamW, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8),
        scheduler=functools.partial(WarmupCosine, warmup_ratio=0.1, warmup_steps=None, min_lr_ratio=0.1),
    )
    module.configure_model()
    module.trainer = trainer(max_steps=20)  # what Lightning does before configure_optimizers
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-6) and lrs[2] == pytest.approx(1e-5)
    assert lrs[11] == pytest.approx(1e-6 + 9e-6 * 0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert lrs[20] == pytest.approx(1e-6)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    names = {id(p): n for n, p in module.model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values() if "norm" in n}
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}
    groups = param_groups(module.model.named_parameters())  # the groups the module hands the optimizer
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(p) for p in g["params"]] for g in (decay, no_decay)]
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0  # the optimizer's own decay
    module.trainer = trainer(max_steps=-1)
    with pytest.raises(ValueError, match=r"trainer\.max_steps"):
        module.configure_optimizers()


# -- the step-mean loss, with a real Trainer -------------------------------------------------------------------


def reference_sum(model: LlamaForCausalLM, batch: PackedBatch) -> tuple[torch.Tensor, int]:
    """Sum of token CE of a micro-batch, each document run alone through `model` with full logits."""
    total, count = 0.0, 0
    for row in range(batch.input_ids.shape[0]):
        starts = (batch.position_ids[row] == 0).nonzero().flatten().tolist() + [batch.input_ids.shape[1]]
        for start, end in zip(starts[:-1], starts[1:]):
            logits = model(input_ids=batch.input_ids[row : row + 1, start:end]).logits[0]  # (n, V)
            targets = batch.labels[row, start + 1 : end]  # (n-1,)
            total = total + F.cross_entropy(logits[:-1], targets, reduction="sum", ignore_index=-100)
            count += int((targets != -100).sum())
    return total, count


@pytest.fixture(scope="module")
def step_batches():
    """Two micro-batches of one step with very different loss-token counts: 62 and 4."""
    full = make_packed_batch([[30, 34]], VOCAB, seed=1)
    masked = make_packed_batch([[64]], VOCAB, seed=2, loss_mask=[[1] * 5 + [0] * 59])
    assert (int(full.loss_tokens), int(masked.loss_tokens)) == (62, 4)
    return full, masked


@pytest.fixture(scope="module")
def initial_state():
    torch.manual_seed(0)
    module = SGDModule(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
                       kernels=KernelSettings(attn_implementation="docmask", docmask_block_size=16))
    module.configure_model()
    return copy.deepcopy(module.model.state_dict())


def fresh_module(state) -> SGDModule:
    module = SGDModule(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
                       kernels=KernelSettings(attn_implementation="docmask", docmask_block_size=16))
    module.configure_model()
    module.model.load_state_dict(state)
    return module


def reference_step(state, batches):
    """The gradient of the token mean over all micro-batches, and the naive mean of per-micro-batch means."""
    module = fresh_module(state)
    model = eager_copy(module).train()
    sums = [reference_sum(model, b) for b in batches]
    tokens = sum(c for _, c in sums)
    mean = sum(s for s, _ in sums) / tokens
    grads = torch.autograd.grad(mean, list(model.parameters()), retain_graph=True)
    naive = torch.autograd.grad(sum(s / c for s, c in sums) / len(sums), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    return mean.item(), dict(zip(names, grads)), dict(zip(names, naive))


def relative_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.mark.parametrize("accumulate", [2, 1], ids=["two-micro-batches", "one-batch-holding-both"])
def test_step_loss_is_the_exact_token_mean(accumulate, step_batches, initial_state, tmp_path):
    full, masked = (copy.deepcopy(b) for b in step_batches)
    batches = share_step([full, masked]) if accumulate == 2 else [concat_rows([full, masked])]
    ref_loss, ref_grads, naive_grads = reference_step(initial_state, [full, masked])
    assert relative_diff(naive_grads, ref_grads) > 0.05  # the per-micro-batch mean is measurably wrong here

    module, capture = fresh_module(initial_state), GradCapture()
    run = trainer(accumulate_grad_batches=accumulate, callbacks=[capture], limit_val_batches=2)
    val = [copy.deepcopy(b) for b in step_batches]
    run.fit(module, train_dataloaders=loader(batches), val_dataloaders=loader(val))

    assert relative_diff(capture.grads, ref_grads) <= 1e-5
    updated = module.model.state_dict()
    for name, grad in ref_grads.items():  # SGD: new = old - lr * grad
        assert torch.allclose(updated[name], initial_state[name] - SGD_LR * grad, rtol=0, atol=1e-6), name
    metrics = run.callback_metrics
    assert metrics["train/loss"].item() == pytest.approx(ref_loss, rel=1e-6)
    assert metrics["train/lr"].item() == SGD_LR
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()])).item()
    assert metrics["train/grad_norm"].item() == pytest.approx(ref_norm, rel=1e-5)

    # val/loss after the step: the token mean over both validation batches (62 + 4 tokens), not their mean
    trained = eager_copy(module)
    with torch.no_grad():
        sums = [reference_sum(trained, b) for b in step_batches]
    assert metrics["val/loss"].item() == pytest.approx(sum(s for s, _ in sums).item() / 66, rel=1e-6)

    if accumulate == 1:  # the checkpoint of this run: compatible and incompatible reloads
        path = tmp_path / "run.ckpt"
        run.save_checkpoint(path)
        # a module built in Python records plain hyper-parameters: its checkpoint loads with torch's weights-only
        # unpickler, its settings and optimizer rebuilt from them
        reloaded = LongContextLM.load_from_checkpoint(path)
        assert reloaded.llama_settings == module.llama_settings and reloaded.kernels == module.kernels
        assert class_path_of(reloaded.optimizer_factory) == class_path_of(module.optimizer_factory)
        assert all(torch.equal(reloaded.model.state_dict()[k], v) for k, v in updated.items())
        with pytest.raises(ValueError, match="checkpoint from an incompatible run.*num_hidden_layers: 2 in the"):
            LongContextLM.load_from_checkpoint(
                path,
                llama=LlamaSettings(name_or_path="tiny", overrides={**OVERRIDES, "num_hidden_layers": 3}))


# -- data / model mismatches -----------------------------------------------------------------------------------


class ManifestData(pl.LightningDataModule):
    def __init__(self, data_dir, batches):
        super().__init__()
        self.manifest = Manifest.read(data_dir)
        self.batches = batches

    def train_dataloader(self):
        return loader(self.batches)


def write_manifest(path, seq_len: int, max_token_id: int = 128009) -> None:
    stats = DomainStats(samples=1, tokens=seq_len, max_token_id=max_token_id, documents={"read": 1, "kept": 1})
    Manifest(tokenizer="llama3", vocab_size=128256, seq_len=seq_len, domains={"books": stats}).write(path)


def test_seq_len_mismatch_with_the_prepared_data(tmp_path, step_batches):
    write_manifest(tmp_path, seq_len=128)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny"), seq_len=64)
    with pytest.raises(ValueError, match=r"data\.seq_len / model\.seq_len mismatch.*rows of 128.*is 64"):
        trainer().fit(module, datamodule=ManifestData(tmp_path, [step_batches[0]]))
    assert module.model is None  # refused before building anything


def test_tokenizer_vocab_mismatch(tmp_path, step_batches):
    write_manifest(tmp_path, seq_len=64)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES), seq_len=64)
    with pytest.raises(ValueError,
                       match=r"tokenizer/model mismatch.*'llama3'.*128009.*model\.llama\.name_or_path 'tiny'.*512"):
        trainer().fit(module, datamodule=ManifestData(tmp_path, [step_batches[0]]))
    check_manifest(Manifest.read(tmp_path), 64, 128256, "tiny")  # the real tokenizer's data fits `tiny`


def test_activation_checkpointing_recomputes_layers_with_equal_gradients(step_batches):
    grads, calls = {}, {}
    for enabled in (False, True):
        torch.manual_seed(0)
        module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
                               kernels=KernelSettings(attn_implementation="docmask"))
        module.set_parallel_plan(ParallelPlan(activation_checkpointing=enabled))  # one process, no Trainer
        module.configure_model()
        module.train()
        count: list[int] = []
        # a pre-hook: the recompute stops as soon as it has what backward needs, before the MLP's forward returns
        module.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, seen=count: seen.append(1))
        loss_sum, _ = module.compute_loss_sum(step_batches[0])
        loss_sum.backward()
        grads[enabled] = {n: p.grad for n, p in module.model.named_parameters()}
        calls[enabled] = len(count)
    assert calls == {False: 1, True: 2}  # the layer ran again in backward
    assert relative_diff(grads[True], grads[False]) <= 1e-6


class NormCounter:
    """Counts torch's total-norm computations (the public one and the one clip_grad_norm_ calls) while patched in."""

    def __init__(self, monkeypatch) -> None:
        import torch.nn.utils.clip_grad as clip_grad

        self.calls = 0
        original = clip_grad._get_total_norm

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(clip_grad, "_get_total_norm", counted)
        monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_reuses_the_logged_pre_clip_norm(algorithm, step_batches, initial_state, monkeypatch):
    """One norm computation per optimizer step (logged, then used to clip by norm), and the update is exactly
    Lightning's clip_grad_norm_ applied to the reference gradient: SGD new = old - lr * g * min(1, c / |g|)."""
    batches = share_step([copy.deepcopy(b) for b in step_batches])
    _, ref_grads, _ = reference_step(initial_state, list(step_batches))
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()])).item()
    clip = 0.25 * ref_norm if algorithm == "norm" else 1e-3  # both clip for real
    counter = NormCounter(monkeypatch)
    module = fresh_module(initial_state)
    run = trainer(accumulate_grad_batches=2, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    run.fit(module, train_dataloaders=loader(batches))
    assert counter.calls == 1  # the logged norm; clipping by value computes none
    assert run.callback_metrics["train/grad_norm"].item() == pytest.approx(ref_norm, rel=1e-5)
    updated = module.model.state_dict()
    for name, grad in ref_grads.items():
        clipped = grad * min(1.0, clip / (ref_norm + 1e-6)) if algorithm == "norm" else grad.clamp(-clip, clip)
        assert torch.allclose(updated[name], initial_state[name] - SGD_LR * clipped, rtol=0, atol=1e-6), name
