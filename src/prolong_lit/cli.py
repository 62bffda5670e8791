"""Command line: `python -m prolong_lit <subcommand>`.

`fit` / `validate` go through `ProLongCLI`, a LightningCLI in omegaconf parser mode (YAML may interpolate with
`${...}`; the resolved config is saved in every run's log directory). The other subcommands are plain functions
that take their own `--config`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Any

# Nothing downloads at run time: fail fast instead of hanging ~50 s on a hub call (ENVIRONMENT.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.fabric.plugins.environments import SLURMEnvironment  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from prolong_lit.callbacks.slurm_requeue import SlurmRequeue  # noqa: E402

log = logging.getLogger(__name__)

# Two Lightning warnings that are wrong for this project, silenced so that real ones stand out:
# - the mixture stream defines __len__ and is exact under any number of workers (each sample is a pure function
#   of its global index; data/mixture.py), so "__len__ could be inaccurate ... with num_workers > 1" is not;
# - LongContextLM.on_after_batch_transfer (sequence-parallel slicing) is meant to run with any DataModule.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")

TRAINER_SUBCOMMANDS = {
    "fit": "train a model (LightningCLI: --config <yaml>, --ckpt_path <ckpt> to resume)",
    "validate": "run the validation loop once (LightningCLI)",
}
# name -> ("module:function taking argv", one-line description); imported lazily so `--help` stays fast.
TOOL_SUBCOMMANDS = {
    "prepare": ("prolong_lit.data.prepare:main", "tokenize, filter and pack raw documents into litdata shards"),
    "eval": ("prolong_lit.eval_command:main", "run the long-context evaluations on a Hugging Face model or checkpoint"),
    "export": ("prolong_lit.export:main", "turn a checkpoint (file or distributed) into a Hugging Face directory"),
    "pipeline": ("prolong_lit.pipeline:main", "run a pipeline file's phases in order (finished phases are skipped)"),
    "tokenizer": ("prolong_lit.cli:tokenizer_main", "build the Llama-3 tokenizer offline into a directory"),
}


class ProLongCLI(LightningCLI):
    """LightningCLI with the project's defaults: any LightningModule/DataModule by `class_path`."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            # A rerun in the same directory (e.g. a resume) rewrites the saved config instead of refusing.
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer; in a Slurm job also a SlurmRequeue callback (checkpoint + requeue at a step
        boundary on every rank, instead of Lightning's checkpoint inside the signal handler)."""
        trainer = super().instantiate_trainer(**kwargs)
        if SLURMEnvironment.detect() and not any(isinstance(c, SlurmRequeue) for c in trainer.callbacks):
            trainer.callbacks.append(SlurmRequeue())
        return trainer

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINER_SUBCOMMANDS}


def tokenizer_main(argv: list[str]) -> None:
    """`python -m prolong_lit tokenizer [--output DIR] [--overwrite]`."""
    import argparse

    from prolong_lit.tokenizer import build_llama3_tokenizer, default_llama3_tokenizer_dir

    parser = argparse.ArgumentParser(prog="prolong_lit tokenizer", description=TOOL_SUBCOMMANDS["tokenizer"][1])
    parser.add_argument("--output", default=str(default_llama3_tokenizer_dir()), help="directory to write")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the directory has one")
    args = parser.parse_args(argv)
    path = build_llama3_tokenizer(args.output, overwrite=args.overwrite)
    log.info("Llama-3 tokenizer at %s", path)


def _usage() -> str:
    lines = ["usage: python -m prolong_lit <subcommand> [options]", "", "subcommands:"]
    for name, text in TRAINER_SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (_, text) in TOOL_SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "`python -m prolong_lit <subcommand> --help` shows a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
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
        sys.exit(f"unknown subcommand {name!r}\n\n{_usage()}")
