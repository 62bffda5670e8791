"""The LightningModule: a Hugging Face LlamaForCausalLM trained on packed, document-masked rows.

Loss normalisation (the contract in the DataModule's collate): every micro-batch carries `step_loss_tokens`, the
number of loss tokens in the whole optimizer step over all micro-batches and data-parallel ranks. The training
step returns sum_CE / step_loss_tokens * A * W; Lightning divides by A (accumulate_grad_batches) and DDP/FSDP
average over W ranks, so the gradient is exactly that of the mean over every loss token of the step, however
unevenly the tokens fall between micro-batches (SFT) or ranks. Under sequence parallelism (parallel/sequence.py)
W is still the whole world: the P ranks of a group hold different tokens of the same rows (gradient_average_size).
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
from prolong_lit.parallel.fsdp import ShardingConfig, build_sharded_llama, fsdp_mesh
from prolong_lit.parallel.sequence import (
    LABELS_SHIFTED,
    SequenceParallel,
    check_sequence_parallel_shape,
    init_sequence_parallel,
    shard_batch,
)
from prolong_lit.parallel.ulysses import SP_KWARG, sequence_parallel_attn_name

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
        fsdp_param_dtype: str | None = None,
        fsdp_reduce_dtype: str | None = "float32",
        fsdp_cpu_offload: bool = False,
        fsdp_reshard_after_forward: bool = True,
        sequence_parallel_size: int = 1,
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
            fsdp_param_dtype: under a sharding strategy (FSDP2Strategy / ModelParallelStrategy), the compute and
                all-gather dtype of the parameters (bfloat16: the recipe's mixed precision, fp32 master weights
                kept sharded); null computes in the parameters' own dtype (full fp32). Ignored without sharding.
            fsdp_reduce_dtype: under sharding, the dtype gradients are reduced in (float32); null: fsdp_param_dtype.
            fsdp_cpu_offload: under sharding, keep sharded parameters, gradients and optimizer states on the CPU.
            fsdp_reshard_after_forward: under sharding, free each decoder layer's gathered parameters after its
                forward (less memory, one more all-gather per layer in backward).
            sequence_parallel_size: P, the ranks that share every row (Ulysses all-to-all attention; ProLong: 8
                at 512K). Must divide the world size, model.seq_len and the attention heads; the ranks of a group
                read the same samples, so the data-parallel size is world / P.
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
        # sequence parallelism: the attention's twin that can exchange heads for sequence; the group is built in
        # setup, once the process group exists
        self.sequence_parallel_size = sequence_parallel_size  # read by the DataModule (data-parallel rank/size)
        self.sequence_parallel: SequenceParallel | None = None
        self._sp_checked_stages: set[str] = set()  # stages whose first batch the SP group compared
        if sequence_parallel_size != 1:
            check_sequence_parallel_shape(sequence_parallel_size, seq_len, self.hf_config.num_attention_heads,
                                          self.hf_config.num_key_value_heads)
            self.attn_name = sequence_parallel_attn_name(self.attn_name)
        self.fsdp_config = ShardingConfig(fsdp_param_dtype, fsdp_reduce_dtype, fsdp_cpu_offload,
                                          fsdp_reshard_after_forward)  # applied when a device mesh exists
        self.model = None  # LlamaForCausalLM, built in configure_model
        self.tokenizer_name: str | None = None  # from the prepared data's manifest, recorded in checkpoints
        self._step_loss_sum: torch.Tensor | None = None  # detached sum_CE of this optimizer step, this rank
        self._step_loss_tokens: torch.Tensor | None = None
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None

    # -- model -------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the Hugging Face model (once). Lightning calls this inside its init contexts (device, dtype).
        Under a sharding strategy (a device mesh exists: FSDP2Strategy, ModelParallelStrategy) the model is
        FSDP2-sharded here (prolong_lit.parallel.fsdp); a checkpoint is then loaded shard by shard."""
        if self.model is not None:
            return
        if self.device_mesh is None:
            self.model = build_llama_model(self.hparams.model, self.hf_config, self.attn_name)
            self._enable_activation_checkpointing(self.model)
        else:
            self.model = build_sharded_llama(self.hparams.model, self.hf_config, self.attn_name,
                                             fsdp_mesh(self.device_mesh), self.fsdp_config,
                                             prepare=self._enable_activation_checkpointing)
        log.info("built %s: %.1fM parameters, attention %s%s", self.hparams.model,
                 sum(p.numel() for p in self.model.parameters()) / 1e6, self.attn_name,
                 "" if self.device_mesh is None else f", sharded ({self.fsdp_config})")

    def _enable_activation_checkpointing(self, model: torch.nn.Module) -> None:
        if not self.hparams.activation_checkpointing:
            return
        # transformers >= 5.2x renamed gradient_checkpointing_enable; both checkpoint each decoder layer's forward
        # (inside FSDP2's hooks, which then stay outside the recompute)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Final hidden states (B, L, d) of a packed micro-batch; documents never attend to each other.

        A micro-batch cut by `shard_batch` (sequence parallelism) holds this rank's chunk of every row; when its
        documents cross chunk boundaries it carries the group, and attention exchanges heads for sequence."""
        cu_seq_lens = batch["cu_seq_lens"]
        max_seqlen = int(batch["max_seqlen"])
        sequence_parallel = batch.get(SP_KWARG)
        extra = {SP_KWARG: sequence_parallel} if sequence_parallel is not None else {}
        out = self.model.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seq_lens_q=cu_seq_lens,
            cu_seq_lens_k=cu_seq_lens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            use_cache=False,
            docmask_block_size=self.hparams.docmask_block_size,
            **extra,
        )
        return out.last_hidden_state  # (B, L, d)

    def compute_loss_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross-entropies, number of loss tokens) of a micro-batch; labels are unshifted unless
        the batch says `labels_shifted` (a sequence-parallel chunk)."""
        if self.sequence_parallel is not None and LABELS_SHIFTED not in batch:
            # a DataModule's own on_after_batch_transfer replaced ours: shard here, the loss stays exact
            batch = shard_batch(batch, self.sequence_parallel)
        hidden = self(batch)  # (B, L, d)
        return chunked_cross_entropy_sum(hidden, batch["labels"], self.model.lm_head, self.hparams.loss_chunk_size,
                                         labels_shifted=bool(batch.get(LABELS_SHIFTED, False)))

    # -- training ----------------------------------------------------------------------------------------------

    def gradient_average_size(self) -> int:
        """Ranks DDP/FSDP average gradients over (W of the loss contract): all of them. Under sequence
        parallelism the P ranks of a group hold different tokens of the same rows and their gradients must add up,
        not average: scaling by world = data_parallel_size * P, not data_parallel_size, does exactly that."""
        return self.trainer.world_size

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Under sequence parallelism, keep this rank's chunk of every row (parallel/sequence.py); callbacks
        then see the chunk too, so token counts summed over ranks stay exact.

        The group checks that its ranks got the same rows (an all-gather) on the first batch of each stage
        only: a DataModule that splits the groups wrongly does so from its first batch on, and the check
        should not cost a collective and a device sync on every micro-batch."""
        if self.sequence_parallel is not None and isinstance(batch, dict) and "cu_seq_lens" in batch:
            stage = str(self.trainer.state.stage)
            check_same = stage not in self._sp_checked_stages
            self._sp_checked_stages.add(stage)
            return shard_batch(batch, self.sequence_parallel, check_same=check_same)
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss_sum, _ = self.compute_loss_sum(batch)
        step_tokens = torch.as_tensor(batch["step_loss_tokens"], device=loss_sum.device)
        scale = self.trainer.accumulate_grad_batches * self.gradient_average_size()
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
        if self.sequence_parallel_size > 1 and self.sequence_parallel is None:
            self.sequence_parallel = init_sequence_parallel(
                self.sequence_parallel_size, self.trainer.strategy.root_device.type, self.device_mesh
            )

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
