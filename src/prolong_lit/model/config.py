"""The Hugging Face LlamaConfig of a run: from a named size or a local checkpoint, plus the run's overrides.

RoPE lives in `config.rope_parameters` in transformers 5 (`{"rope_theta": ..., "rope_type": ...}` plus the
scaling type's own fields); `rope_theta` / `rope_scaling` overrides are written there, so an exported checkpoint
carries them and loads in plain transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prolong_lit.errors import ConfigError
from prolong_lit.model.sizes import size_config_kwargs

log = logging.getLogger(__name__)

# Fields that decide parameter shapes: a checkpoint is only compatible with a module that agrees on all of them.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)
_ROPE_FIELDS = ("rope_parameters", "rope_theta", "rope_scaling")


def is_checkpoint_dir(model: str) -> bool:
    """True if `model` names a local Hugging Face checkpoint directory (one holding config.json)."""
    return (Path(model).expanduser() / "config.json").is_file()


def build_llama_config(
    model: str = "tiny",
    model_overrides: dict[str, Any] | None = None,
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> LlamaConfig:
    """The LlamaConfig for `model` (a size name or a checkpoint directory) with the run's overrides applied.

    `rope_scaling` replaces the checkpoint's scaling (type and its fields) and keeps its `rope_theta` unless
    `rope_theta` is given too; `{"rope_type": "default"}` removes a checkpoint's scaling. `use_cache` is always
    False: with a cache in training, packed documents silently attend across their boundaries.
    """
    if is_checkpoint_dir(model):
        config = _checkpoint_config(model)
    else:
        config = LlamaConfig(**size_config_kwargs(model))
    overrides = dict(model_overrides or {})
    if ({"hidden_size", "num_attention_heads"} & overrides.keys()) and "head_dim" not in overrides:
        # head_dim is stored explicitly; keep it consistent with a changed width or head count
        hidden = overrides.get("hidden_size", config.hidden_size)
        overrides["head_dim"] = hidden // overrides.get("num_attention_heads", config.num_attention_heads)
    for key, value in overrides.items():
        _apply_override(config, key, value)
    config.rope_parameters = _rope_parameters(config.rope_parameters, rope_theta, rope_scaling)
    if max_position_embeddings is not None:
        config.max_position_embeddings = int(max_position_embeddings)
    config.use_cache = False
    try:
        config.validate()
    except Exception as err:  # the strict dataclass names the bad field; say which settings feed it
        raise ConfigError(
            "model.llama.overrides / model.llama.rope_theta / model.llama.rope_scaling / "
            f"model.llama.max_position_embeddings "
            f"give an invalid Llama config: {err}"
        ) from err
    return config


def build_llama_model(model: str, config: LlamaConfig, attn_implementation: str) -> LlamaForCausalLM:
    """A LlamaForCausalLM: weights as they are from a checkpoint directory, else freshly initialised.

    Parameters take torch's default dtype, so Lightning's `*-true` precisions (which set it while the model is
    built) get the model directly in their dtype; fp32 otherwise (the recipe's fp32 master weights).
    """
    dtype = torch.get_default_dtype()
    config = copy.deepcopy(config)  # the model keeps (and mutates) its own copy
    if is_checkpoint_dir(model):
        log.info("loading weights from %s (%s)", model, dtype)
        # from_pretrained returns eval mode, which Lightning keeps and which silently disables transformers'
        # activation checkpointing: training starts in train mode
        return LlamaForCausalLM.from_pretrained(
            model, config=config, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
        ).train()
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def architecture(config: LlamaConfig | dict[str, Any]) -> dict[str, Any]:
    """The shape-deciding fields of a config (object or dict), for compatibility checks."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return {key: get(key) for key in ARCHITECTURE_FIELDS}


def _checkpoint_config(path: str) -> LlamaConfig:
    raw = json.loads((Path(path).expanduser() / "config.json").read_text())
    if raw.get("model_type") != "llama":
        raise ConfigError(
            f"model.llama.name_or_path: {path!r} holds a {raw.get('model_type')!r} checkpoint; only Llama checkpoints "
            "(model_type 'llama') are supported"
        )
    return LlamaConfig.from_pretrained(path, local_files_only=True)


def _apply_override(config: LlamaConfig, key: str, value: Any) -> None:
    if key in _ROPE_FIELDS:
        raise ConfigError(
            f"model.llama.overrides: set {key!r} with model.llama.rope_theta / model.llama.rope_scaling instead"
        )
    fields = {field.name for field in dataclasses.fields(config)}
    if key not in fields:
        raise ConfigError(
            f"model.llama.overrides: {key!r} is not a LlamaConfig field (known: {', '.join(sorted(fields))})"
        )
    try:
        setattr(config, key, value)
    except Exception as err:  # strict dataclass type check
        raise ConfigError(f"model.llama.overrides: {key}={value!r} is invalid: {err}") from err


def _rope_parameters(
    current: dict[str, Any] | None, rope_theta: float | None, rope_scaling: dict[str, Any] | None
) -> dict[str, Any]:
    params = dict(current or {})
    if rope_scaling is not None:
        scaling = dict(rope_scaling)
        if "type" in scaling and "rope_type" not in scaling:  # transformers 4 spelling
            scaling["rope_type"] = scaling.pop("type")
        if "rope_type" not in scaling:
            raise ConfigError(
                "model.llama.rope_scaling: needs a 'rope_type' (e.g. 'default', 'linear', 'llama3', 'yarn')"
            )
        params = {"rope_theta": params.get("rope_theta"), **scaling}
    if rope_theta is not None:
        params["rope_theta"] = float(rope_theta)
    if params.get("rope_theta") is None:
        raise ConfigError("model.llama.rope_theta: the model's config has no rope_theta; set one")
    params.setdefault("rope_type", "default")
    return params
