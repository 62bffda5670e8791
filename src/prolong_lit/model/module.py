"""The LightningModule: a Hugging Face LlamaForCausalLM trained on packed, document-masked rows.

Loss normalisation (the contract in the DataModule's collate): every micro-batch carries `step_loss_tokens`, the
number of loss tokens in the whole optimizer step over all micro-batches and data-parallel ranks. The training
step returns sum_CE / step_loss_tokens * A * W; Lightning divides by A (accumulate_grad_batches) and DDP/FSDP
average over W ranks, so the gradient is exactly that of the mean over every loss token of the step, however
unevenly the tokens fall between micro-batches (SFT) or ranks. Under sequence parallelism (parallel/sequence.py)
W is still the whole world: the P ranks of a group hold different tokens of the same rows (gradient_average_size).

Parallelism is not configured here: the module asks the trainer's strategy for its parallel plan
(`prolong_lit.parallel.plan.plan_of`) and builds the Llama laid out by it (`prolong_lit.model.parallelize`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from torch.distributed.tensor import DTensor

from prolong_lit.checkpoint import HF_CONFIG_KEY, run_metadata
from prolong_lit.data.format import PackedBatch
from prolong_lit.model.attention import (
    chosen_kernel,
    default_device,
    resolve_attn_implementation,
    sequence_parallel_attn_name,
)
from prolong_lit.model.config import architecture, build_llama_config
from prolong_lit.model.liger_loss import check_liger_available, liger_cross_entropy_sum
from prolong_lit.model.loss import chunked_cross_entropy_sum
from prolong_lit.model.offload_norm import offloaded_on_device_mesh, offloaded_total_norm
from prolong_lit.model.optim import (
    AdamW,
    OptimizerFactory,
    SchedulerFactory,
    WarmupCosine,
    apply_configured_hyperparameters,
    check_optimizer_settings,
    class_path_of,
    factory_from,
    param_groups,
)
from prolong_lit.model.parallelize import build_parallel_llama
from prolong_lit.model.sequence_batch import shard_batch
from prolong_lit.model.settings import KernelSettings, LlamaSettings, settings_from
from prolong_lit.parallel.plan import ParallelPlan, plan_of
from prolong_lit.parallel.sequence import check_sequence_parallel_shape
from prolong_lit.parallel.ulysses import SP_KWARG
from prolong_lit.resume_settings import differences

log = logging.getLogger(__name__)

DEFAULT_LLAMA, DEFAULT_KERNELS = LlamaSettings(), KernelSettings()  # shared defaults: never mutated


# the recorded settings a resume may change (prolong_lit.resume_settings): applied in on_train_start
TRAINING_SETTINGS = ("optimizer", "scheduler")


class LongContextLM(pl.LightningModule):
    """Continued pretraining / SFT of a Llama model on packed rows (the ProLong recipe)."""

    def __init__(
        self,
        llama: LlamaSettings = DEFAULT_LLAMA,
        seq_len: int | None = None,
        kernels: KernelSettings = DEFAULT_KERNELS,
        optimizer: OptimizerFactory = AdamW,
        scheduler: SchedulerFactory = WarmupCosine,
    ) -> None:
        """
        Args:
            llama: the Llama the run starts from (a checkpoint directory or a named size) and its RoPE / length
                overrides.
            seq_len: training row length in tokens; None (what the configs use): the DataModule's `seq_len`, read
                at set-up, so data.seq_len is the one place that says it (without a DataModule: the batches').
                Given, it must equal the prepared data's.
            kernels: the attention implementation and the loss chunking.
            optimizer: the optimizer, called with the parameter groups (weight decay on matrices only); AdamW with
                the recipe's defaults (lr 1e-5, betas (0.9, 0.95), weight decay 0.1, eps 1e-8).
            scheduler: the learning-rate schedule, called with (optimizer, trainer.max_steps) and stepped every
                optimizer step; linear warmup + cosine to 10% (the recipe's).
        """
        super().__init__()
        # hyper-parameters are recorded as plain data (what load_from_checkpoint passes back, as mappings)
        llama, kernels = settings_from(LlamaSettings, llama), settings_from(KernelSettings, kernels)
        optimizer, scheduler = factory_from(optimizer), factory_from(scheduler)
        self.save_hyperparameters()
        self._record_plain_hyperparameters()
        self.llama_settings, self.kernels, self.seq_len = llama, kernels, seq_len
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.attn_name = resolve_attn_implementation(kernels.attn_implementation)
        self.hf_config = build_llama_config(llama.name_or_path, llama.overrides, llama.rope_theta, llama.rope_scaling,
                                            llama.max_position_embeddings)
        if seq_len is not None:
            self._check_seq_len(seq_len)
        self.model = None  # LlamaForCausalLM, built in configure_model
        self.attn_kernel: str | None = None  # the attention kernel that runs (fa4, flash, ...), set there too
        self.tokenizer_name: str | None = None  # from the prepared data's manifest, recorded in checkpoints
        self._plan: ParallelPlan | None = None  # set_parallel_plan, else the trainer's strategy's (parallel_plan)
        self._sp_checked_stages: set[str] = set()  # stages whose first batch the SP group compared
        self._step_loss_sum: torch.Tensor | None = None  # detached sum_CE of this optimizer step, this rank
        self._step_loss_tokens: torch.Tensor | None = None
        self._pre_clip_norm: tuple[list, torch.Tensor] | None = None  # this step's parameters, gradient norm
        self._val_sum: torch.Tensor | None = None
        self._val_count: torch.Tensor | None = None

    def _record_plain_hyperparameters(self) -> None:
        """A module built in Python would record its settings as objects (dataclasses, classes, partials), which
        torch's weights-only checkpoint loading refuses: record them as mappings and class paths instead. (A module
        built by the CLI records the CLI's own config, already plain.)"""
        for key in ("llama", "kernels"):
            if dataclasses.is_dataclass(self.hparams.get(key)):
                self.hparams[key] = dataclasses.asdict(self.hparams[key])
        for key in ("optimizer", "scheduler"):
            if callable(self.hparams.get(key)):
                self.hparams[key] = class_path_of(self.hparams[key])

    def _check_seq_len(self, seq_len: int) -> None:
        if self.hf_config.max_position_embeddings < seq_len:
            raise ValueError(
                f"model.llama.max_position_embeddings ({self.hf_config.max_position_embeddings}) must be >= the "
                f"training length ({seq_len}, data.seq_len); set model.llama.max_position_embeddings"
            )

    # -- parallel plan -----------------------------------------------------------------------------------------

    @property
    def parallel_plan(self) -> ParallelPlan:
        """How this rank's model is laid out: the trainer's strategy's plan (a plain one-rank plan when the module
        runs outside a Trainer and none was set)."""
        if self._plan is not None:
            return self._plan
        if self._trainer is not None:
            return plan_of(self.trainer.strategy)
        return ParallelPlan()

    def set_parallel_plan(self, plan: ParallelPlan) -> None:
        """Use `plan` instead of the strategy's (a module driven by hand, outside a Trainer); before
        configure_model."""
        if self.model is not None:
            raise RuntimeError("set_parallel_plan must come before configure_model builds the model")
        self._plan = plan

    @property
    def sequence_parallel(self):
        """This rank's sequence-parallel group (None: every rank holds whole rows)."""
        return self.parallel_plan.sequence_parallel

    # -- model -------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the Hugging Face model (once), laid out by the parallel plan: sharded with FSDP2 when the plan
        has a shard mesh (a checkpoint is then loaded shard by shard), checkpointed per decoder layer when it
        says so. Lightning calls this inside its init contexts (device, dtype)."""
        if self.model is not None:
            return
        if self.kernels.loss_implementation == "liger":  # refused before anything is built or written
            check_liger_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        plan = self.parallel_plan
        attn_name = self.attn_name
        if plan.sequence_parallel is not None:
            check_sequence_parallel_shape(plan.sequence_parallel_size, self.seq_len,
                                          self.hf_config.num_attention_heads, self.hf_config.num_key_value_heads)
            attn_name = sequence_parallel_attn_name(attn_name)  # the twin that can exchange heads for sequence
        self.model = build_parallel_llama(self.llama_settings.name_or_path, self.hf_config, attn_name, plan,
                                          compile_blocks=self.kernels.compile_blocks)
        device = self.trainer.strategy.root_device if self._trainer is not None else default_device()
        self.attn_kernel = chosen_kernel(attn_name, device)  # recorded with the run's hyper-parameters (on_fit_start)
        log.info("built %s: %.1fM parameters, attention %s (kernel %s on %s)%s", self.llama_settings.name_or_path,
                 sum(p.numel() for p in self.model.parameters()) / 1e6, attn_name, self.attn_kernel, device,
                 "" if plan.shard_mesh is None else f", sharded ({plan.sharding})")

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Final hidden states (B, L, d) of a packed micro-batch; documents never attend to each other.

        A micro-batch cut by `shard_batch` (sequence parallelism) holds this rank's chunk of every row; when its
        documents cross chunk boundaries (`sequence_exchange`) attention exchanges heads for sequence within
        this rank's group."""
        extra = {SP_KWARG: self.sequence_parallel} if batch.sequence_exchange else {}
        # the boundaries as host ints for attention: the collate's, else read back once here, not once per layer.
        # Not with compiled blocks: a tuple whose length changes with every batch would recompile the layers;
        # docmask then reads them per layer (the GPU kernels never need them: they take cu_seq_lens as it is).
        if self.kernels.compile_blocks:
            bounds = None
        else:
            bounds = batch.doc_bounds if batch.doc_bounds is not None else tuple(batch.cu_seq_lens.tolist())
        out = self.model.model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            cu_seq_lens_q=batch.cu_seq_lens,
            cu_seq_lens_k=batch.cu_seq_lens,
            max_length_q=int(batch.max_seqlen),
            max_length_k=int(batch.max_seqlen),
            use_cache=False,
            docmask_block_size=self.kernels.docmask_block_size,
            doc_bounds=bounds,
            **extra,
        )
        return out.last_hidden_state  # (B, L, d)

    def compute_loss_sum(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross-entropies, number of loss tokens) of a micro-batch; labels are unshifted unless
        the batch says `labels_shifted` (a sequence-parallel chunk)."""
        if self.sequence_parallel is not None and not batch.labels_shifted:
            # a DataModule's own on_after_batch_transfer replaced ours: shard here, the loss stays exact
            batch = shard_batch(batch, self.sequence_parallel)
        hidden = self(batch)  # (B, L, d)
        if self.kernels.loss_implementation == "liger":
            return liger_cross_entropy_sum(hidden, batch.labels, self.model.lm_head, batch.labels_shifted)
        return chunked_cross_entropy_sum(hidden, batch.labels, self.model.lm_head, self.kernels.loss_chunk_size,
                                         labels_shifted=batch.labels_shifted,
                                         implementation=self.kernels.loss_implementation)

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
        if self.sequence_parallel is not None and isinstance(batch, PackedBatch) and not batch.labels_shifted:
            stage = str(self.trainer.state.stage)
            check_same = stage not in self._sp_checked_stages
            self._sp_checked_stages.add(stage)
            return shard_batch(batch, self.sequence_parallel, check_same=check_same)
        return batch

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        loss_sum, _ = self.compute_loss_sum(batch)
        step_tokens = torch.as_tensor(batch.step_loss_tokens, device=loss_sum.device)
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
        # Lightning clips after this hook (configure_gradient_clipping), which reuses this norm
        params, norm = pre_clip_grad_norm(optimizer)
        self._pre_clip_norm = (params, norm)
        self.log("train/grad_norm", _full(norm) if params else torch.zeros((), device=self.device),
                 on_step=True, on_epoch=False)
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by norm with the norm on_before_optimizer_step computed and logged, instead of computing it a
        second time (a reduction over every gradient, and under FSDP2 a collective); anything else (clipping by
        value, a precision plugin with its own clipping) goes to Lightning's own."""
        cached, self._pre_clip_norm = self._pre_clip_norm, None
        algorithm = (gradient_clip_algorithm or "norm").lower()
        reusable = (
            cached is not None and algorithm == "norm" and gradient_clip_val
            and type(self.trainer.precision_plugin).clip_grad_by_norm is Precision.clip_grad_by_norm
        )
        if not reusable:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params, norm = cached
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(param_groups(self.model.named_parameters()))
        scheduler = self.scheduler_factory(optimizer, self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation --------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.int64, device=self.device)

    def validation_step(self, batch: PackedBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
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
        if self.seq_len is None and getattr(datamodule, "seq_len", None) is not None:
            self.seq_len = int(datamodule.seq_len)  # the configs' choice: train at the length the data holds
            self._check_seq_len(self.seq_len)
        manifest = getattr(datamodule, "manifest", None)
        if manifest is not None:
            check_manifest(manifest, self.seq_len, self.hf_config.vocab_size, self.llama_settings.name_or_path)
            self.tokenizer_name = manifest.tokenizer

    def check_training_settings(self, max_steps: int) -> None:
        """Refuse a bad optimizer or schedule setting before anything runs (the CLI calls it before `fit`)."""
        check_optimizer_settings(self.optimizer_factory, self.scheduler_factory, max_steps)

    def on_fit_start(self) -> None:
        """Record the attention kernel that runs beside the hyper-parameters (hparams.yaml, TensorBoard): not in
        `hparams` itself, which a resume passes back to __init__."""
        for logger in self.loggers:
            logger.log_hyperparams({"attn_kernel": self.attn_kernel})

    def on_train_start(self) -> None:
        """On a resume whose config changed the optimizer's or the schedule's settings (a new learning rate, say),
        those apply from the resumed step on instead of the restored ones (the moments are kept)."""
        recorded = getattr(self, "_resumed_training_settings", None)
        if recorded and any(differences({key: recorded[key]}, {key: self.hparams.get(key)})
                            for key in TRAINING_SETTINGS if recorded[key] is not None):
            configured = self.optimizer_factory(param_groups(self.model.named_parameters()))
            self.scheduler_factory(configured, self.trainer.max_steps)  # sets the groups' initial_lr, as configured
            scheduler = self.lr_schedulers()
            apply_configured_hyperparameters(self.trainer.optimizers[0], scheduler, configured)
        self._resumed_training_settings = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the Hugging Face config (export rebuilds the model from it) and the data's tokenizer (saved beside it)
        checkpoint.update(run_metadata(self.hf_config, self.tokenizer_name))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("hyper_parameters") or {}
        self._resumed_training_settings = {key: recorded.get(key) for key in TRAINING_SETTINGS}
        saved = checkpoint.get(HF_CONFIG_KEY)
        if saved is None:
            return
        theirs, ours = architecture(saved), architecture(self.hf_config)
        diffs = [f"{key}: {theirs[key]} in the checkpoint, {ours[key]} here"
                 for key in ours if theirs[key] != ours[key]]
        if diffs:
            raise ValueError(
                "checkpoint from an incompatible run: its model differs from model.llama.name_or_path "
                f"{self.llama_settings.name_or_path!r} (+ model.llama.overrides): " + "; ".join(diffs)
            )


def pre_clip_grad_norm(optimizer: torch.optim.Optimizer) -> tuple[list[torch.nn.Parameter], torch.Tensor | None]:
    """(parameters with a gradient, total L2 norm of their gradients) of the optimizer: what Lightning's
    clipping would compute (its `main_params` are the optimizer's). Under FSDP2 the norm is a DTensor, as
    clipping expects."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        return params, None
    grads = [p.grad for p in params]
    if offloaded_on_device_mesh(grads):  # FSDP2 CPU offload under NCCL: no CPU backend to reduce CPU tensors
        return params, offloaded_total_norm(grads)
    return params, torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def check_manifest(manifest: Any, seq_len: int, vocab_size: int, model_name: str) -> None:
    """The prepared data must match the model: same row length, token ids inside the model's vocabulary."""
    if manifest.seq_len != seq_len:
        raise ValueError(
            f"data.seq_len / model.seq_len mismatch: the prepared data holds rows of {manifest.seq_len} tokens "
            f"but model.seq_len is {seq_len}; set data.seq_len to {manifest.seq_len} (model.seq_len follows it "
            "unless set) "
            "or prepare the data again"
        )
    max_token_id = max((_field(stats, "max_token_id") for stats in manifest.domains.values()), default=-1)
    if max_token_id >= vocab_size or manifest.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer/model mismatch: the data was tokenized with {manifest.tokenizer!r} (vocabulary "
            f"{manifest.vocab_size}, largest token id {max_token_id}) but model.llama.name_or_path {model_name!r} has "
            f"vocab_size {vocab_size}; use the tokenizer that matches the model"
        )


def _field(stats: Any, name: str) -> Any:
    return stats[name] if isinstance(stats, dict) else getattr(stats, name)
