"""`fit` / `validate`: `ProLongCLI`, a LightningCLI in omegaconf parser mode (YAML may interpolate with `${...}`,
resolved within each file; the resolved config is saved in every run's log directory). Repeated `--config` files
merge in order: a recipe stage is `--config configs/prolong-8b/base.yaml --config .../stage1-64k.yaml`.

A run's files follow `trainer.default_root_dir` (the working directory when unset) unless a config names them:
the TensorBoard logs go to `<root>/logs` (one fixed folder, so a resume appends to it) and the checkpoints of a
ModelCheckpoint without `dirpath` to `<root>/checkpoints`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from prolong_lit.callbacks.slurm_requeue import SlurmRequeue
from prolong_lit.checkpoint_io import AtomicCheckpointIO
from prolong_lit.checkpoint_resume import resolve_resume_path
from prolong_lit.errors import ConfigError
from prolong_lit.resume_settings import (
    RESUME_SETTINGS,
    check_resume,
    model_differences,
    recorded_model_settings,
)
from prolong_lit.subcommands import TRAINER_SUBCOMMANDS

# Two Lightning warnings that are wrong for this project, silenced so that real ones stand out:
# - the mixture stream defines __len__ and is exact under any number of workers (each sample is a pure function
#   of its global index; data/mixture.py), so "__len__ could be inaccurate ... with num_workers > 1" is not;
# - LongContextLM.on_after_batch_transfer (sequence-parallel slicing) is meant to run with any DataModule.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")

# `--ckpt_path` values Lightning resolves itself to a file in the run's checkpoint folder
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class ProLongCLI(LightningCLI):
    """LightningCLI with the project's defaults: any LightningModule/DataModule by `class_path`.

    `parse_only=True` parses and checks a config without building anything (`config` then holds it; a bad
    config raises instead of exiting): what the pipeline uses to check and record a phase's config."""

    def __init__(self, args: list[str] | None = None, run: bool = True, parse_only: bool = False) -> None:
        self.parse_only = parse_only
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf", **({"exit_on_error": False} if parse_only else {})},
            # A rerun in the same directory (e.g. a resume) rewrites the saved config instead of refusing.
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run and not parse_only,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--resume_settings", choices=list(RESUME_SETTINGS), default="config",
            help="with --ckpt_path: 'config' applies the config's model settings (the optimizer's and the "
            "schedule's may change, the model's must equal the checkpoint's) and 'checkpoint' keeps the "
            "checkpoint's recorded ones; every differing setting is logged",
        )

    def _parse_ckpt_path(self) -> None:
        """Instead of Lightning's silent replacement of `model.*` by the checkpoint's hyper-parameters: compare
        them with the config, then refuse, apply or keep them as `--resume_settings` says (prolong_lit.resume_settings).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS:
            return
        recorded = recorded_model_settings(ckpt_path)
        policy = config.get("resume_settings", "config")
        check_resume(recorded, config["model"].as_dict(), policy, ckpt_path)
        if policy == "checkpoint" and recorded is not None:
            self.config = self.parser.parse_object({subcommand: {"model": recorded}}, self.config)

    def instantiate_classes(self) -> None:
        if not self.parse_only:
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer, its logs and checkpoints under its root directory unless configured
        elsewhere; in a Slurm job also a SlurmRequeue callback (checkpoint + requeue at a step boundary on every
        rank, instead of Lightning's checkpoint inside the signal handler)."""
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        if config.get("logger") in (None, True):  # Lightning's default logger, in a folder a resume reuses
            kwargs["logger"] = TensorBoardLogger(save_dir=root, name="", version="logs")
        trainer = super().instantiate_trainer(**kwargs)
        for checkpoint in trainer.checkpoint_callbacks:
            if getattr(checkpoint, "dirpath", "") is None:
                checkpoint.dirpath = os.path.realpath(os.path.join(root, "checkpoints"))
        if SLURMEnvironment.detect() and not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks):
            trainer.callbacks.append(SlurmRequeue())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a plugin the config chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # whole checkpoints or none (checkpoint_io.py)
        return trainer

    def before_fit(self) -> None:
        """Before anything is written: the model's training settings are checked; then `--ckpt_path last` / `hpc`
        and a Slurm requeue resume from the newest checkpoint that loads (a damaged newer one is named in a warning),
        never silently from scratch (prolong_lit.checkpoint_resume)."""
        check_training_settings = getattr(self.model, "check_training_settings", None)
        if callable(check_training_settings):  # a bad optimizer/schedule setting: refused before anything is written
            check_training_settings(self.trainer.max_steps)
        config = self.config_init[self.subcommand]
        asked = config.get("ckpt_path")
        config["ckpt_path"] = resolve_resume_path(asked, self.trainer)
        if asked in LIGHTNING_CKPT_KEYWORDS and config["ckpt_path"] not in (None, *LIGHTNING_CKPT_KEYWORDS):
            self._check_resolved_resume(config["ckpt_path"], asked)

    def _check_resolved_resume(self, ckpt_path: str, asked: str) -> None:
        """`--ckpt_path last` (resolved only now) gets the settings check an explicit path got at parsing; the
        model is already built from the config, so `--resume_settings checkpoint` needs the explicit path."""
        config = self.config[self.subcommand]
        recorded, configured = recorded_model_settings(ckpt_path), config["model"].as_dict()
        if config.get("resume_settings", "config") == "config":
            check_resume(recorded, configured, "config", ckpt_path)
        elif recorded is not None and model_differences(recorded, configured):
            raise ConfigError(
                f"--resume_settings checkpoint with --ckpt_path {asked}: give the checkpoint's path ({ckpt_path}) "
                "instead, so that its recorded model settings can replace the config's before the model is built"
            )

    def dump_config(self) -> str:
        """The parsed config as YAML (a file `fit --config` runs as it is)."""
        return self.parser.dump(self.config, skip_none=False)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINER_SUBCOMMANDS}
