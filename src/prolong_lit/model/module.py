"""The LightningModule: a Hugging Face LlamaForCausalLM trained on packed, document-masked rows.

Loss normalisation (the contract in the DataModule's collate): every micro-batch carries `step_loss_tokens`, the
number of loss tokens in the whole optimizer step over all micro-batches and data-parallel ranks. The training
step returns sum_CE / step_loss_tokens * A * W; Lightning divides by A (accumulate_grad_batches) and DDP/FSDP
average over W ranks, so the gradient is exactly that of the mean over every loss token of the step, however
unevenly the tokens fall between micro-batches (SFT) or ranks.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor

from prolong_lit.model.attention import DEFAULT_DOCMASK_BLOCK_SIZE, resolve_attn_implementation
from prolong_lit.model.config import architecture, build_llama_config, build_llama_model
from prolong_lit.model.loss import chunked_cross_entropy_sum
from prolong_lit.model.schedule import build_optimizer

log = logging.getLogger(__name__)

HF_CONFIG_KEY = "hf_config"  # the checkpoint entry holding the Hugging Face config dict
TOKENIZER_KEY = "tokenizer"  # the checkpoint entry naming the tokenizer the training data was prepared with


class LongContextLM(pl.LightningModule):
    """Continued pretraining / SFT of a Llama model on packed rows (the ProLong recipe)."""

    def __init__(
        self,
        model: str = "tiny",
        model_overrides: dict[str, Any] | None = None,
        rope_theta: float | None = None,
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int | None = None,
        seq_len: int = 2048,
        attn_implementation: str = "auto",
        docmask_block_size: int = DEFAULT_DOCMASK_BLOCK_SIZE,
        loss_chunk_size: int = 2048,
        activation_checkpointing: bool = False,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        eps: float = 1e-8,
        warmup_ratio: float = 0.1,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        """
        Args:
            model: a named size (`tiny` for the demo and tests, `llama3-8b`) or a local Hugging Face checkpoint
                directory whose weights load as they are.
            model_overrides: other LlamaConfig fields to change, e.g. {num_hidden_layers: 4}.
            rope_theta: RoPE base written into the config (ProLong: 8e6 at 64K, 1.28e8 at 512K); None keeps it.
            rope_scaling: RoPE scaling dict (`rope_type` plus its fields) replacing the checkpoint's; None keeps it,
                {rope_type: default} removes it (ProLong uses none).
            max_position_embeddings: written into the config; must be >= seq_len. None keeps the model's.
            seq_len: training row length in tokens; the prepared data's seq_len must match (data.seq_len is linked).
            attn_implementation: auto (FlashAttention-2 varlen on CUDA with flash-attn, exact document-masked SDPA
                otherwise), flash, docmask, or transformers' sdpa/eager (dense L x L packed mask; comparisons only).
            docmask_block_size: queries per SDPA call in the document-masked attention (memory ~ block x doc length).
            loss_chunk_size: tokens per chunk of the LM head + cross-entropy (the full logits never exist).
            activation_checkpointing: recompute each decoder layer in backward (needed at 64K and beyond).
            lr: peak learning rate (paper: 1e-5; SFT 2e-5).
            betas: AdamW betas.
            weight_decay: AdamW weight decay on matrices (not on norms and biases).
            eps: AdamW epsilon.
            warmup_ratio: linear warmup length as a fraction of trainer.max_steps (ignored if warmup_steps is set).
            warmup_steps: linear warmup length in optimizer steps.
            min_lr_ratio: the cosine decays to this fraction of lr at trainer.max_steps.
        """
        super().__init__()
        self.save_hyperparameters()
        if docmask_block_size < 1 or loss_chunk_size < 1:
            raise ValueError("model.docmask_block_size and model.loss_chunk_size must be >= 1")
        self.attn_name = resolve_attn_implementation(attn_implementation)
        self.hf_config = build_llama_config(model, model_overrides, rope_theta, rope_scaling,
                                            max_position_embeddings)
        if self.hf_config.max_position_embeddings < seq_len:
            raise ValueError(
                f"model.max_position_embeddings ({self.hf_config.max_position_embeddings}) must be >= "
                f"model.seq_len ({seq_len}); set model.max_position_embeddings"
            )
        self.model = None  # LlamaForCausalLM, built in configure_model
        self.tokenizer_name: str | None = None  # from the prepared data's manifest, recorded in checkpoints
        self._step_loss_sum: torch.Tensor | None = None  # detached sum_CE of this optimizer step, this rank
        self._step_loss_tokens: torch.Tensor | None = None
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None

    # -- model -------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the Hugging Face model (once). Lightning calls this inside its init contexts (device, dtype);
        a sharding strategy can wrap `self.model` after it."""
        if self.model is not None:
            return
        self.model = build_llama_model(self.hparams.model, self.hf_config, self.attn_name)
        if self.hparams.activation_checkpointing:
            # transformers >= 5.2x renamed gradient_checkpointing_enable; both checkpoint each decoder layer
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("built %s: %.1fM parameters, attention %s", self.hparams.model,
                 sum(p.numel() for p in self.model.parameters()) / 1e6, self.attn_name)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Final hidden states (B, L, d) of a packed micro-batch; documents never attend to each other."""
        cu_seq_lens = batch["cu_seq_lens"]
        max_seqlen = int(batch["max_seqlen"])
        out = self.model.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seq_lens_q=cu_seq_lens,
            cu_seq_lens_k=cu_seq_lens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            use_cache=False,
            docmask_block_size=self.hparams.docmask_block_size,
        )
        return out.last_hidden_state  # (B, L, d)

    def compute_loss_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross-entropies, number of loss tokens) of a micro-batch; labels are unshifted."""
        hidden = self(batch)  # (B, L, d)
        return chunked_cross_entropy_sum(hidden, batch["labels"], self.model.lm_head, self.hparams.loss_chunk_size)

    # -- training ----------------------------------------------------------------------------------------------

    def data_parallel_size(self) -> int:
        """Ranks whose gradients are averaged (W of the loss contract)."""
        return self.trainer.world_size

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss_sum, _ = self.compute_loss_sum(batch)
        step_tokens = torch.as_tensor(batch["step_loss_tokens"], device=loss_sum.device)
        scale = self.trainer.accumulate_grad_batches * self.data_parallel_size()
        detached = loss_sum.detach()
        self._step_loss_sum = detached if self._step_loss_sum is None else self._step_loss_sum + detached
        self._step_loss_tokens = step_tokens
        return loss_sum / step_tokens.clamp(min=1) * scale

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step's exact token-mean loss, the pre-clip gradient norm and the learning rate."""
        if self._step_loss_sum is not None:
            total = self.trainer.strategy.reduce(self._step_loss_sum.double(), reduce_op="sum")
            mean = total / self._step_loss_tokens.clamp(min=1).to(total.device)
            self.log("train/loss", mean.float(), on_step=True, on_epoch=False, prog_bar=True)
            self._step_loss_sum = None
        self.log("train/grad_norm", self._grad_norm(), on_step=True, on_epoch=False)
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)

    def _grad_norm(self) -> torch.Tensor:
        # Before clipping (Lightning clips after this hook). Under fp16 AMP the gradients are still scaled here.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer, scheduler = build_optimizer(
            self.model, hp.lr, hp.betas, hp.weight_decay, hp.eps, self.trainer.max_steps,
            hp.warmup_ratio, hp.warmup_steps, hp.min_lr_ratio,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation --------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.int64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss_sum, count = self.compute_loss_sum(batch)
        self._val_sum += loss_sum.detach().double()
        self._val_count += count

    def on_validation_epoch_end(self) -> None:
        """`val/loss`: the exact token mean over the whole validation set and all ranks."""
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        self.log("val/loss", (total / count.clamp(min=1)).float(), prog_bar=True)

    # -- checks and checkpoints --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        manifest = getattr(datamodule, "manifest", None)
        if manifest is not None:
            check_manifest(manifest, self.hparams.seq_len, self.hf_config.vocab_size, self.hparams.model)
            self.tokenizer_name = manifest.tokenizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HF_CONFIG_KEY] = self.hf_config.to_dict()
        if self.tokenizer_name is not None:
            # the tokenizer the data was prepared with: `export` saves it beside the weights by default
            checkpoint[TOKENIZER_KEY] = self.tokenizer_name

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(HF_CONFIG_KEY)
        if saved is None:
            return
        theirs, ours = architecture(saved), architecture(self.hf_config)
        diffs = [f"{key}: {theirs[key]} in the checkpoint, {ours[key]} here"
                 for key in ours if theirs[key] != ours[key]]
        if diffs:
            raise ValueError(
                "checkpoint from an incompatible run: its model differs from model.model "
                f"{self.hparams.model!r} (+ model.model_overrides): " + "; ".join(diffs)
            )


def check_manifest(manifest: Any, seq_len: int, vocab_size: int, model_name: str) -> None:
    """The prepared data must match the model: same row length, token ids inside the model's vocabulary."""
    if manifest.seq_len != seq_len:
        raise ValueError(
            f"data.seq_len / model.seq_len mismatch: the prepared data holds rows of {manifest.seq_len} tokens "
            f"but model.seq_len is {seq_len}; set model.seq_len (data.seq_len follows it) to {manifest.seq_len} "
            "or prepare the data again"
        )
    max_token_id = max((_field(stats, "max_token_id") for stats in manifest.domains.values()), default=-1)
    if max_token_id >= vocab_size or manifest.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer/model mismatch: the data was tokenized with {manifest.tokenizer!r} (vocabulary "
            f"{manifest.vocab_size}, largest token id {max_token_id}) but model.model {model_name!r} has "
            f"vocab_size {vocab_size}; use the tokenizer that matches the model"
        )


def _field(stats: Any, name: str) -> Any:
    return stats[name] if isinstance(stats, dict) else getattr(stats, name)
