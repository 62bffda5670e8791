"""`python -m prolong_lit eval`: the long-context evaluation of a saved model, with the callback's code and report.

    python -m prolong_lit eval --model runs/demo/pretrain/checkpoints/last.ckpt --output runs/demo/eval-last
    python -m prolong_lit eval --model exports/stage1 --config callbacks/long_eval.yaml --lengths 32768 65536 \
        --output evals/stage1

`--model` is a Hugging Face model directory (config.json + weights; loaded with AutoModelForCausalLM) or a
LongContextLM checkpoint, a single file or a distributed-checkpoint directory (read by `prolong_lit.checkpoint`,
as the export reads it). What to evaluate (`EvalSettings`, whose fields are the flags; `--no_cache` sets its
use_cache to false) comes from, in increasing priority: EvalSettings' defaults, the LongContextEval settings saved
in the checkpoint (a run that had the callback), `--config` (a callbacks bundle or a run's config.yaml holding a
LongContextEval entry, or a flat mapping of the options below), and the flags.
The tokenizer: `--tokenizer`, else the one those settings name, else the one the checkpoint records, else the
model directory's own, else `llama3`.

`python -m prolong_lit eval --list_tasks` prints every registered task with its HELMET category, metric,
generation length and data source (generated, or the HELMET file it reads), and exits.

Writes `<output>/eval_results.json`, `eval_report.md`, HELMET's table (`helmet_table.csv`, `helmet_table.md`) and
the PNG pictures (as the callback's `step<N>/` folders);
refuses an output folder that already holds a report unless `--overwrite`. Every check runs before the weights
load. Under `torchrun --nproc_per_node N` the ranks share the examples (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from prolong_lit.checkpoint import (
    HF_CONFIG_KEY,
    TOKENIZER_FILES,
    build_model,
    export_config,
    model_state,
    read_checkpoint_meta,
    recorded_tokenizer,
)
from prolong_lit.commands import command_parser
from prolong_lit.constants import DTYPES
from prolong_lit.errors import ConfigError, ExistingPathError, MissingPathError
from prolong_lit.evals import EvalResults, EvalSettings, check_settings, run_evaluation, write_report
from prolong_lit.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CALLBACK_NAME = "LongContextEval"
REPORT_FILES = ("eval_results.json", "eval_report.md", "score_vs_length.png")
# EvalSettings' fields that are flags; use_cache is the exception: decoding without the cache is what a flag asks.
SETTING_FLAGS = tuple(f.name for f in dataclasses.fields(EvalSettings) if f.name != "use_cache")
# The callback's arguments that only schedule or route its evaluations: ignored here.
SCHEDULE_ARGS = {"every_n_steps", "eval_at_start", "eval_at_end", "output_dir", "log_images"}


class EvalConfigFile(ActionConfigFile):
    """`--config`: the evaluation options of a YAML file (`settings_from_yaml`), merged as a config file is."""

    def __call__(self, parser, cfg, values, option_string=None) -> None:
        options = settings_from_yaml(values)
        self.apply_config(parser, cfg, self.dest, yaml.safe_dump(options))
        cfg[self.dest][-1] = values  # the file, where the merge recorded the YAML text it was given


def build_parser() -> ArgumentParser:
    """The options of `eval`: the model, the output, EvalSettings' fields, and how to run the model."""
    parser = command_parser(
        "eval", "The long-context evaluation of a Hugging Face model or a checkpoint.", config_action=EvalConfigFile,
        config_help=f"YAML: a callbacks bundle / run config with {CALLBACK_NAME}, or a mapping of the options below",
    )
    parser.add_argument("--model", type=str, required=True,
                        help="Hugging Face model directory, or a checkpoint (a file or a distributed directory)")
    parser.add_argument("--output", type=str, required=True, help="folder for the JSON, Markdown and PNG report")
    parser.add_argument("--tokenizer", type=str | None, default=None, help="tokenizer directory or `llama3`")
    _add_setting_flags(parser)
    parser.add_argument("--no_cache", action="store_true", help="decode without a KV cache (benchmarks only)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --output")
    parser.add_argument("--list_tasks", action="store_true",
                        help="print every task (category, metric, data source) and exit; needs no other flag")
    parser.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on GPU, else fp32")
    parser.add_argument("--attn_implementation", type=str, default="sdpa",
                        help="transformers attention for generation")
    return parser


def _add_setting_flags(parser: ArgumentParser) -> None:
    """One flag per EvalSettings field, with the field's documentation. Each defaults to None, "not given", so a
    lower-priority source (the checkpoint's saved settings, EvalSettings' defaults) fills it; lists take several
    values (`--lengths 32768 65536`)."""
    import docstring_parser

    docs = {p.arg_name: p.description for p in docstring_parser.parse(EvalSettings.__doc__).params}
    hints = typing.get_type_hints(EvalSettings)
    for name in SETTING_FLAGS:
        hint = hints[name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(hint) is list:
            parser.add_argument(f"--{name}", type=typing.get_args(hint)[0], nargs="+", default=None, help=docs[name])
        else:
            parser.add_argument(f"--{name}", type=hint | None, default=None, help=docs[name])


# -- settings --------------------------------------------------------------------------------------------------


def _find_callback_args(node: Any) -> dict[str, Any] | None:
    """The init_args of the first LongContextEval entry anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        if str(node.get("class_path", "")).rsplit(".", 1)[-1] == CALLBACK_NAME:
            return dict(node.get("init_args") or {})
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_callback_args(child)
        if found is not None:
            return found
    return None


def settings_from_yaml(path: str | Path) -> dict[str, Any]:
    """The evaluation options a YAML file gives, as a flat mapping of this command's options: a LongContextEval
    entry's init_args (its `settings` mapping flattened; entries written before `settings` existed are flat
    already), or a flat mapping. The callback's scheduling arguments are dropped; `use_cache: false` becomes
    `no_cache: true`."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"--config: {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    found = _find_callback_args(tree)
    if found is None:
        if not isinstance(tree, dict):
            raise ConfigError(f"--config: {path} holds neither a {CALLBACK_NAME} entry nor a mapping of its options")
        found = dict(tree)
    nested = found.pop("settings", None) or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"--config: {path}: `settings` must be a mapping of EvalSettings' fields")
    options = {**found, **nested}
    if "use_cache" in options:
        options["no_cache"] = options.pop("use_cache") is False
    unknown = sorted(set(options) - _option_names() - SCHEDULE_ARGS)
    if unknown:
        raise ConfigError(f"--config: {path} gives unknown evaluation options {unknown}")
    return {k: v for k, v in options.items() if k not in SCHEDULE_ARGS}


@functools.cache
def _option_names() -> set[str]:
    return {action.dest for action in build_parser()._actions} - {"help", "config", "print_config"}


def _checkpoint_callback_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    states = [s for key, s in (checkpoint.get("callbacks") or {}).items() if key.startswith(CALLBACK_NAME)]
    if not states or "settings" not in states[0]:
        return {}
    return {**states[0]["settings"], "tokenizer": states[0].get("tokenizer")}


def resolve_settings(args: Namespace, saved: dict[str, Any]) -> tuple[EvalSettings, str | None]:
    """Flags and --config (already merged by the parser) over the checkpoint's saved callback settings over the
    defaults; (the settings, the tokenizer they name or None)."""
    merged: dict[str, Any] = {k: v for k, v in saved.items() if v is not None}
    merged.update({k: args[k] for k in (*SETTING_FLAGS, "tokenizer") if args[k] is not None})
    if args.no_cache:
        merged["use_cache"] = False
    tokenizer = merged.pop("tokenizer", None)
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    try:
        return EvalSettings(**{k: v for k, v in merged.items() if k in fields}), tokenizer
    except ValueError as err:  # its messages start with the field's name, which is the flag's
        raise ConfigError(f"--{err}") from err


# -- the model -------------------------------------------------------------------------------------------------


def read_model_meta(path: Path) -> dict[str, Any] | None:
    """The checkpoint's non-tensor content (a file or a distributed-checkpoint directory), or None for a Hugging
    Face directory."""
    if path.is_dir() and (path / "config.json").is_file():
        return None
    try:
        return read_checkpoint_meta(path)
    except (ValueError, FileNotFoundError) as err:  # the reader's messages name export's flag
        raise type(err)(str(err).replace("--checkpoint:", "--model:", 1)) from err


def model_config(path: Path, meta: dict[str, Any] | None, dtype: torch.dtype):
    """The transformers config of `--model`, without loading weights."""
    from transformers import AutoConfig

    if meta is not None:
        return export_config(meta[HF_CONFIG_KEY], dtype)  # as trained, use_cache on
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def load_model(path: Path, meta: dict[str, Any] | None, config, dtype: torch.dtype, device: torch.device,
               attn_implementation: str) -> torch.nn.Module:
    """The causal LM in eval mode on `device`: from a Hugging Face directory, or rebuilt from a checkpoint with
    the export's own code (so `eval` on a checkpoint and on its export load the same model)."""
    from transformers import AutoModelForCausalLM

    if meta is None:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
        return model.to(device).eval()
    config._attn_implementation = attn_implementation
    return build_model(config, model_state(path, meta), dtype).to(device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_output(output: Path, overwrite: bool) -> None:
    existing = [str(output / n) for n in REPORT_FILES if (output / n).exists()]
    if existing and not overwrite:
        raise ExistingPathError(f"--output: {output} already holds a report ({existing}); pass --overwrite")


# -- the command -----------------------------------------------------------------------------------------------


def evaluate(argv: list[str]) -> EvalResults:
    """Run the command; returns the results (every rank gets them)."""
    import torch.distributed as dist

    args = build_parser().parse_args(argv)
    output, model_path = Path(args.output), Path(args.model)
    _check_output(output, args.overwrite)
    if not model_path.exists():
        raise MissingPathError(f"--model: {model_path} does not exist")
    meta = read_model_meta(model_path)
    settings, tokenizer_name = resolve_settings(args, _checkpoint_callback_settings(meta or {}))
    if tokenizer_name is None and meta is not None:
        tokenizer_name = recorded_tokenizer(meta)
    if tokenizer_name is None:
        has_own = meta is None and any((model_path / f).is_file() for f in TOKENIZER_FILES)
        tokenizer_name = str(model_path) if has_own else "llama3"
    tokenizer = load_tokenizer(tokenizer_name, setting="--tokenizer")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = model_config(model_path, meta, dtype)
    helmet_data = check_settings(settings, tokenizer, config.vocab_size, config.max_position_embeddings,
                                 prefix="--", tokenizer_setting="--tokenizer")

    own_group = world > 1 and not dist.is_initialized()
    if own_group:  # launched by torchrun: the ranks share the examples
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        model = load_model(model_path, meta, config, dtype, device, args.attn_implementation)
        del meta
        log.info("evaluating %s (tokenizer %s) on %s: %s", model_path, tokenizer_name, device, settings)
        results = run_evaluation(model, tokenizer, settings, config.max_position_embeddings,
                                 distributed=world > 1, helmet_data=helmet_data)
        if world == 1 or dist.get_rank() == 0:
            write_report(results, output, title=f"Long-context evaluation of {model_path}", overwrite=args.overwrite)
            log.info("report in %s: %s", output, ", ".join(f"{k} {v:.1f}" for k, v in results.flat().items()))
    finally:
        if own_group:
            dist.destroy_process_group()
    return results


def main(argv: list[str]) -> None:
    """Entry point of `python -m prolong_lit eval` (TOOL_SUBCOMMANDS)."""
    if "--list_tasks" in argv:  # needs no model: print the registry's tasks and stop
        from prolong_lit.evals.catalog import render_task_list

        print(render_task_list())
        return
    evaluate(argv)
