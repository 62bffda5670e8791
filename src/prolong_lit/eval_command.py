"""`python -m prolong_lit eval`: the long-context evaluation of a saved model, with the callback's code and report.

    python -m prolong_lit eval --model runs/demo/pretrain/checkpoints/last.ckpt --output runs/demo/eval-last
    python -m prolong_lit eval --model exports/stage1 --config callbacks/long_eval.yaml --lengths 32768 65536 \
        --output evals/stage1

`--model` is a Hugging Face model directory (config.json + weights; loaded with AutoModelForCausalLM) or a
LongContextLM checkpoint, a single file or a distributed-checkpoint directory (read by the export's code, with the
Hugging Face config under "hf_config" and the weights under "model."). What to evaluate comes from, in
increasing priority: the defaults of `LongContextEval`, the LongContextEval settings saved in the checkpoint (a run
that had the callback), `--config` (a callbacks bundle or a run's config.yaml holding a LongContextEval entry, or a
flat mapping of the options below), and the flags.
The tokenizer: `--tokenizer`, else the one those settings name, else the one the checkpoint records, else the
model directory's own, else `llama3`.

Writes `<output>/eval_results.json`, `eval_report.md` and the PNG pictures (as the callback's `step<N>/` folders);
refuses an output folder that already holds a report unless `--overwrite`. Every check runs before the weights
load. Under `torchrun --nproc_per_node N` the ranks share the examples (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from prolong_lit.callbacks.long_eval import EvalSettings, check_settings
from prolong_lit.evals import EvalResults, write_report
from prolong_lit.export import (
    DTYPES,
    HF_CONFIG_KEY,
    TOKENIZER_FILES,
    build_model,
    export_config,
    model_state,
    read_checkpoint_meta,
    recorded_tokenizer,
)
from prolong_lit.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CALLBACK_NAME = "LongContextEval"
REPORT_FILES = ("eval_results.json", "eval_report.md", "score_vs_length.png")
_SETTING_FIELDS = {f.name for f in dataclasses.fields(EvalSettings)}
# The callback's arguments that only schedule or route its evaluations: ignored here.
_SCHEDULE_ARGS = {"every_n_steps", "eval_at_start", "eval_at_end", "output_dir", "log_images"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prolong_lit eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Hugging Face model directory, or a checkpoint (a file or a distributed directory)")
    parser.add_argument("--output", required=True, help="folder for the JSON, Markdown and PNG report")
    parser.add_argument("--config", help="YAML: a callbacks bundle / run config with LongContextEval, or a mapping")
    parser.add_argument("--tokenizer", help="tokenizer directory or `llama3`")
    parser.add_argument("--tasks", nargs="+", help="task names (default: the five synthetic recall tasks)")
    parser.add_argument("--lengths", nargs="+", type=int, help="lengths in tokens (default: max_position_embeddings)")
    parser.add_argument("--depths", nargs="+", type=float, help="needle depths in [0, 1]")
    parser.add_argument("--samples_per_task", type=int, help="examples per synthetic task@length / HELMET items")
    parser.add_argument("--seed", type=int, help="seed of the prompts")
    parser.add_argument("--helmet_dir", help="HELMET's data/ folder (for the HELMET file tasks)")
    parser.add_argument("--batch_size", type=int, help="prompts decoded together")
    parser.add_argument("--max_new_tokens", type=int, help="cap on every task's generation length")
    parser.add_argument("--no_cache", action="store_true", help="decode without a KV cache (benchmarks only)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --output")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on GPU, else fp32")
    parser.add_argument("--attn_implementation", default="sdpa", help="transformers attention for generation")
    return parser


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
    """The evaluation arguments a YAML file gives (a LongContextEval entry's init_args, or a flat mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    found = _find_callback_args(tree)
    if found is None:
        if not isinstance(tree, dict):
            raise ValueError(f"--config: {path} holds neither a {CALLBACK_NAME} entry nor a mapping of its options")
        found = tree
    unknown = sorted(set(found) - _SETTING_FIELDS - _SCHEDULE_ARGS - {"tokenizer"})
    if unknown:
        raise ValueError(f"--config: {path} gives unknown evaluation options {unknown}")
    return {k: v for k, v in found.items() if k not in _SCHEDULE_ARGS}


def _checkpoint_callback_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    states = [s for key, s in (checkpoint.get("callbacks") or {}).items() if key.startswith(CALLBACK_NAME)]
    if not states or "settings" not in states[0]:
        return {}
    return {**states[0]["settings"], "tokenizer": states[0].get("tokenizer")}


def resolve_settings(args: argparse.Namespace, saved: dict[str, Any]) -> tuple[EvalSettings, str | None]:
    """Flags over --config over the checkpoint's saved callback settings over the defaults."""
    merged: dict[str, Any] = {k: v for k, v in saved.items() if v is not None}
    if args.config:
        merged.update({k: v for k, v in settings_from_yaml(args.config).items() if v is not None})
    flags = {k: getattr(args, k) for k in _SETTING_FIELDS | {"tokenizer"} if getattr(args, k, None) is not None}
    merged.update(flags)
    if args.no_cache:
        merged["use_cache"] = False
    tokenizer = merged.pop("tokenizer", None)
    return EvalSettings(**{k: v for k, v in merged.items() if k in _SETTING_FIELDS}), tokenizer


# -- the model -------------------------------------------------------------------------------------------------


def read_model_meta(path: Path) -> dict[str, Any] | None:
    """The checkpoint's non-tensor content (export's reader: a file or a distributed-checkpoint directory), or
    None for a Hugging Face directory."""
    if path.is_dir() and (path / "config.json").is_file():
        return None
    try:
        return read_checkpoint_meta(path)
    except (ValueError, FileNotFoundError) as err:  # export's messages name its own flag
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
        raise FileExistsError(f"--output: {output} already holds a report ({existing}); pass --overwrite")


# -- the command -----------------------------------------------------------------------------------------------


def evaluate(argv: list[str]) -> EvalResults:
    """Run the command; returns the results (every rank gets them)."""
    import torch.distributed as dist

    args = build_parser().parse_args(argv)
    output, model_path = Path(args.output), Path(args.model)
    _check_output(output, args.overwrite)
    if not model_path.exists():
        raise FileNotFoundError(f"--model: {model_path} does not exist")
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
    helmet_data = check_settings(settings, tokenizer, config.vocab_size, config.max_position_embeddings, prefix="--")

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
        results = settings.run(model, tokenizer, config.max_position_embeddings, world > 1, helmet_data)
        if world == 1 or dist.get_rank() == 0:
            write_report(results, output, title=f"Long-context evaluation of {model_path}", overwrite=args.overwrite)
            log.info("report in %s: %s", output, ", ".join(f"{k} {v:.1f}" for k, v in results.flat().items()))
    finally:
        if own_group:
            dist.destroy_process_group()
    return results


def main(argv: list[str]) -> None:
    """Entry point of `python -m prolong_lit eval` (TOOL_SUBCOMMANDS)."""
    evaluate(argv)
