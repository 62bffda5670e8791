"""The subcommands of `python -m prolong_lit`, by name: read by cli.py (dispatch, usage) and trainer_cli.py
(the ones LightningCLI runs), neither importing the other."""

from __future__ import annotations

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
