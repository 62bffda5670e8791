"""Checkpoints of a LongContextLM run: what they hold, how to read them, and their Hugging Face export.

A checkpoint is either Lightning's single file (`*.ckpt`) or the directory Lightning's ModelParallelStrategy
writes for a distributed (FSDP2) checkpoint: torch.distributed.checkpoint shards plus `meta.pt` holding the rest of
the checkpoint. A distributed checkpoint is read in this one process without a process group: only the model's
tensors (never the optimizer's) are allocated at their full size and filled from the shards.

Besides Lightning's own entries every checkpoint holds `run_metadata` (the Hugging Face config, the tokenizer) and
the optimizer's parameter names (`PARAM_NAMES_KEY`, written by the optimizer hand-off callback), so the readers
here need neither Lightning nor the LightningModule: `export_hf`, the `eval` command and the hand-off all read
checkpoints through this module.

The export holds config.json (the trained `rope_parameters` / `max_position_embeddings`, `use_cache` on, no custom
attention name), generation_config.json, safetensors weights and the tokenizer. It is written into a scratch
directory beside the output and moved into place when complete, so a failed export leaves no half directory.
Errors name the command-line flag to fix (`--checkpoint`, `--output`, `--tokenizer`, `--dtype`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from prolong_lit.constants import DTYPES
from prolong_lit.errors import CheckpointError, ConfigError, ExistingPathError, MissingPathError

log = logging.getLogger(__name__)

# Entries a LongContextLM run adds to every checkpoint.
HF_CONFIG_KEY = "hf_config"  # the Hugging Face config dict of the trained model
TOKENIZER_KEY = "tokenizer"  # the run's tokenizer (a directory or `llama3`), where the run knows it
PARAM_NAMES_KEY = "optimizer_param_names"  # [[names of param group 0], [names of group 1], ...]

DCP_META_FILE = "meta.pt"  # the non-tensor part of Lightning's distributed checkpoint (fabric's _METADATA_FILENAME)
DCP_INDEX_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shards
MODULE_PREFIX = "model."  # LongContextLM keeps the LlamaForCausalLM in `self.model`
# Wrapper names that torch.compile / activation checkpointing / FSDP1 insert into parameter names.
WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
# Config keys that name an attention implementation: prolong_lit's are registered only inside prolong_lit.
ATTN_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def run_metadata(hf_config, tokenizer_name: str | None) -> dict[str, Any]:
    """The entries a LongContextLM writes into every checkpoint (`checkpoint.update(run_metadata(...))`): its
    Hugging Face config, and the tokenizer its data was prepared with when known (the export's default)."""
    entries: dict[str, Any] = {HF_CONFIG_KEY: hf_config.to_dict()}
    if tokenizer_name is not None:
        entries[TOKENIZER_KEY] = tokenizer_name
    return entries


# ---- reading ------------------------------------------------------------------------------------------------


def load_checkpoint_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the Hugging Face config dict, the LlamaForCausalLM state dict with transformers' names) of a checkpoint.

    `path` is a single-file Lightning checkpoint or a distributed-checkpoint directory; tensors keep their saved
    dtype, on CPU.
    """
    meta = read_checkpoint_meta(path)
    return meta[HF_CONFIG_KEY], model_state(path, meta)


def model_state(path: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The LlamaForCausalLM state dict of the checkpoint at `path` whose `read_checkpoint_meta` is `meta`."""
    path = Path(path)
    return hf_state_dict(_read_dcp_model_state(path) if path.is_dir() else meta["state_dict"])


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (for a single file: tensors memory-mapped, not read); a clear error if it is not a
    prolong_lit checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"--checkpoint: {str(path)!r} does not exist")
    if path.is_dir():
        if (path / "config.json").is_file():
            raise CheckpointError(f"--checkpoint: {str(path)!r} is already a Hugging Face model directory")
        if not (path / DCP_META_FILE).is_file() or not (path / DCP_INDEX_FILE).is_file():
            raise CheckpointError(
                f"--checkpoint: {str(path)!r} is a directory but not a distributed checkpoint (no {DCP_META_FILE} "
                f"and {DCP_INDEX_FILE}); give a .ckpt file or the directory ModelParallelStrategy saved"
            )
        checkpoint = _load_or_explain(path / DCP_META_FILE, path)
    else:
        checkpoint = _load_or_explain(path, path)
    if not isinstance(checkpoint, dict) or HF_CONFIG_KEY not in checkpoint:
        raise CheckpointError(
            f"--checkpoint: {str(path)!r} is not a prolong_lit checkpoint (it has no {HF_CONFIG_KEY!r} entry; "
            "export a checkpoint saved by a LongContextLM run)"
        )
    if not path.is_dir() and "state_dict" not in checkpoint:
        raise CheckpointError(f"--checkpoint: {str(path)!r} holds no 'state_dict' (a weights-free checkpoint?)")
    return checkpoint


def torch_load(file: str | Path) -> Any:
    """A checkpoint file's content on CPU, its tensors memory-mapped (read only when used).

    weights_only=False: a Lightning checkpoint pickles its hyper-parameters; it is the user's own run's file, loaded
    as Lightning itself loads it. mmap: the optimizer's moments (2x the weights) are never read unless asked for.
    """
    return torch.load(file, map_location="cpu", mmap=True, weights_only=False)


def _load_or_explain(file: Path, checkpoint: Path) -> Any:
    try:
        return torch_load(file)
    except Exception as err:
        raise CheckpointError(f"--checkpoint: {str(checkpoint)!r} is not a readable checkpoint: {err}") from err


def _read_dcp_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The module's full (unsharded) tensors from a torch.distributed.checkpoint directory, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    # Lightning saves {"state_dict": module state, "optimizer_0": ...}; DCP flattens it to "state_dict.<name>"
    # and keeps the original path in planner_data. Allocate only the module's tensors, at their global size.
    state: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        where = (metadata.planner_data or {}).get(key, ())
        if len(where) == 2 and where[0] == "state_dict" and isinstance(item, TensorStorageMetadata):
            state[where[1]] = torch.empty(item.size, dtype=item.properties.dtype)  # global shape
    if not state:
        raise CheckpointError(f"--checkpoint: the distributed checkpoint {str(path)!r} holds no model 'state_dict'")
    loaded = {"state_dict": state}
    with warnings.catch_warnings():  # "no process group: loading in a single process" is exactly the intent
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(loaded, storage_reader=reader, no_dist=True)
    return loaded["state_dict"]


def parameter_name(name: str) -> str:
    """A parameter's name without wrapper parts, so the same weight matches across wrappings and phases."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def hf_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """LongContextLM state-dict names ("model.model.layers.0...") -> LlamaForCausalLM names ("model.layers.0...")."""
    out = {}
    for name, tensor in state_dict.items():
        if not name.startswith(MODULE_PREFIX):
            log.debug("skipping %s: not a weight of the LlamaForCausalLM", name)
            continue
        out[parameter_name(name[len(MODULE_PREFIX):])] = tensor
    if not out:
        raise CheckpointError("--checkpoint: its state_dict holds no weight of `model` (the LongContextLM's Llama)")
    return out


def recorded_tokenizer(checkpoint: dict[str, Any]) -> str | None:
    """The run's tokenizer if the checkpoint says which: its `tokenizer` entry, else the Hugging Face directory
    the run started from (`model.llama.name_or_path`; `model.model` in older checkpoints) if it holds tokenizer
    files (the recipe starts from one)."""
    if checkpoint.get(TOKENIZER_KEY):
        return str(checkpoint[TOKENIZER_KEY])
    hparams = checkpoint.get("hyper_parameters") or {}
    llama = hparams.get("llama")  # LongContextLM's LlamaSettings (read by attribute: no import of the model here)
    start = llama.get("name_or_path") if isinstance(llama, dict) else getattr(llama, "name_or_path", None)
    start = start or hparams.get("model")
    if isinstance(start, str) and any((Path(start).expanduser() / f).is_file() for f in TOKENIZER_FILES):
        return start
    return None


# ---- the Hugging Face model -----------------------------------------------------------------------------------


def export_config(hf_config: dict[str, Any], dtype: torch.dtype):
    """The LlamaConfig to publish: as trained (rope_parameters, max_position_embeddings), with use_cache on for
    inference, transformers' own attention, and the export dtype."""
    from transformers import LlamaConfig

    values = {key: value for key, value in hf_config.items() if key not in ATTN_KEYS}
    if values.get("model_type", "llama") != "llama":
        raise CheckpointError(f"--checkpoint: its model is a {values['model_type']!r}, only Llama models export")
    config = LlamaConfig.from_dict(values)
    config.use_cache = True  # training turns it off (packed rows); generation needs it
    config.dtype = dtype
    return config


def build_model(config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype):
    """A LlamaForCausalLM holding exactly `state_dict` (cast to `dtype`), built without a random initialisation."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    weights = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}
    result = model.load_state_dict(weights, strict=False, assign=True)
    missing = [name for name in result.missing_keys if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            "--checkpoint: its weights do not match its hf_config: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its inv_freq buffer was built on the meta device
    return model.eval()


def _add_stop_token(model, tokenizer) -> None:
    """Generation stops at the tokenizer's eos too (Llama-3 Instruct's <|eot_id|>), as Meta's releases do."""
    generation = model.generation_config
    stops = generation.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty `output_dir` without `overwrite`, and anything but a Hugging Face directory with it."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ExistingPathError(f"--output: {str(output_dir)!r} exists and is not a directory")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise ExistingPathError(f"--output: {str(output_dir)!r} is not empty; pass --overwrite to replace it")
    if not (output_dir / "config.json").is_file():
        raise ExistingPathError(
            f"--output: {str(output_dir)!r} is not a Hugging Face model directory (no config.json); refusing to "
            "delete it even with --overwrite; remove it yourself or choose another --output"
        )


def export_hf(
    checkpoint: str | Path,
    output_dir: str | Path,
    tokenizer: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face directory of `checkpoint` into `output_dir`; returns `output_dir`.

    Args:
        checkpoint: a single-file Lightning checkpoint or a distributed-checkpoint directory of a LongContextLM run.
        output_dir: the directory to write; it must not exist or be empty (or, with `overwrite`, be an export).
        tokenizer: a local tokenizer directory or `llama3`; None takes the one the checkpoint records.
        dtype: weight dtype of the export (bfloat16, float16, float32); the training weights are fp32.
        overwrite: replace an existing Hugging Face directory at `output_dir`.
    """
    from prolong_lit.tokenizer import load_tokenizer

    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    meta = read_checkpoint_meta(checkpoint)
    tokenizer = tokenizer or recorded_tokenizer(meta)
    if tokenizer is None:
        raise ConfigError(
            f"--tokenizer: the checkpoint {str(checkpoint)!r} does not record its tokenizer; pass --tokenizer "
            "(a local tokenizer directory, or `llama3`)"
        )
    hf_tokenizer = load_tokenizer(tokenizer, setting="--tokenizer")
    config = export_config(meta[HF_CONFIG_KEY], DTYPES[dtype])
    if len(hf_tokenizer) > config.vocab_size:
        raise ConfigError(
            f"--tokenizer: {tokenizer!r} has {len(hf_tokenizer)} tokens but the model's vocabulary is "
            f"{config.vocab_size}; give the tokenizer the run was trained with"
        )
    model = build_model(config, model_state(checkpoint, meta), DTYPES[dtype])
    _add_stop_token(model, hf_tokenizer)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.export-", dir=output_dir.parent) as scratch:
        staged = Path(scratch) / "out"
        model.save_pretrained(str(staged))  # safetensors (the only format of transformers 5)
        hf_tokenizer.save_pretrained(str(staged))
        if output_dir.exists():  # check_output_dir allowed it: empty, or an export replaced with --overwrite
            shutil.rmtree(output_dir)
        staged.rename(output_dir)
    log.info("exported %s (step %s, %s, rope %s, max_position_embeddings %d) to %s", checkpoint,
             meta.get("global_step"), dtype, config.rope_parameters, config.max_position_embeddings, output_dir)
    return output_dir
