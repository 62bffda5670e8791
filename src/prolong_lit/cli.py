"""Command line: `python -m prolong_lit <subcommand>`.

`fit` / `validate` go through `ProLongCLI`, a LightningCLI in omegaconf parser mode (YAML may interpolate with
`${...}`, resolved within each file; the resolved config is saved in every run's log directory). Repeated `--config`
files merge in order: a recipe stage is `--config configs/prolong-8b/base.yaml --config .../stage1-64k.yaml`.
The other subcommands (prolong_lit.commands) parse with jsonargparse too, each with its own `--config`.

A run's files follow `trainer.default_root_dir` (the working directory when unset) unless a config names them:
the TensorBoard logs go to `<root>/logs` (one fixed folder, so a resume appends to it) and the checkpoints of a
ModelCheckpoint without `dirpath` to `<root>/checkpoints`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any

# Nothing downloads at run time: fail fast instead of hanging ~50 s on a hub call
# (docs/environment.md, Offline by default).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.fabric.plugins.environments import SLURMEnvironment  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

from prolong_lit.callbacks.slurm_requeue import SlurmRequeue  # noqa: E402
from prolong_lit.checkpoint_io import AtomicCheckpointIO  # noqa: E402
from prolong_lit.checkpoint_resume import resolve_resume_path  # noqa: E402
from prolong_lit.errors import USER_ERROR_EXIT_STATUS, ConfigError, show_tracebacks, user_error_of  # noqa: E402
from prolong_lit.resume_settings import (  # noqa: E402
    RESUME_SETTINGS,
    check_resume,
    model_differences,
    recorded_model_settings,
)

log = logging.getLogger(__name__)

# Two Lightning warnings that are wrong for this project, silenced so that real ones stand out:
# - the mixture stream defines __len__ and is exact under any number of workers (each sample is a pure function
#   of its global index; data/mixture.py), so "__len__ could be inaccurate ... with num_workers > 1" is not;
# - LongContextLM.on_after_batch_transfer (sequence-parallel slicing) is meant to run with any DataModule.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")

# `--ckpt_path` values Lightning resolves itself to a file in the run's checkpoint folder
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
TRAINER_SUBCOMMANDS = {
    "fit": "train a model (LightningCLI: --config <yaml>, --ckpt_path <ckpt> to resume)",
    "validate": "run the validation loop once (LightningCLI)",
}
# name -> ("module:function taking argv", one-line description); imported lazily so `--help` stays fast.
TOOL_SUBCOMMANDS = {
    "prepare": ("prolong_lit.commands.prepare:main", "tokenize, filter and pack raw documents into litdata shards"),
    "eval": ("prolong_lit.commands.eval:main", "long-context evaluations of a Hugging Face model or a checkpoint"),
    "export": ("prolong_lit.commands.export:main", "a checkpoint (file or distributed) -> a Hugging Face directory"),
    "pipeline": ("prolong_lit.commands.pipeline:main", "run a pipeline file's phases in order, skipping finished ones"),
    "tokenizer": ("prolong_lit.commands.tokenizer:main", "build the Llama-3 tokenizer offline into a directory"),
}


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


def _usage() -> str:
    lines = ["usage: python -m prolong_lit <subcommand> [options]", "", "subcommands:"]
    for name, text in TRAINER_SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (_, text) in TOOL_SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "`python -m prolong_lit <subcommand> --help` shows a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. A user's mistake (prolong_lit.errors.UserError, also when Lightning or a DataLoader
    worker re-raised it wrapped) ends as one line on stderr and exit status 2; `PROLONG_LIT_DEBUG=1` keeps the
    traceback. Any other exception is a bug and propagates with its traceback."""
    try:
        _dispatch(argv)
    except Exception as error:  # noqa: BLE001 - re-raised below unless it is the user's mistake
        user_error = user_error_of(error)
        if user_error is None or show_tracebacks():
            raise
        print(f"error: {user_error}", file=sys.stderr)  # noqa: T201 - the command's one-line refusal
        sys.exit(USER_ERROR_EXIT_STATUS)


def _dispatch(argv: list[str] | None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())  # noqa: T201 - the help text is the command's output
        return
    name = argv[0]
    if name in TOOL_SUBCOMMANDS:
        module_name, func_name = TOOL_SUBCOMMANDS[name][0].split(":")
        getattr(importlib.import_module(module_name), func_name)(argv[1:])
    elif name in TRAINER_SUBCOMMANDS:
        # LightningCLI reads sys.argv itself when run from the command line (and warns if given both).
        ProLongCLI(args=None if from_command_line else argv)
    else:
        print(f"error: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)  # noqa: T201
        sys.exit(USER_ERROR_EXIT_STATUS)
