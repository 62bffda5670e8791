"""Fill a sharded (DTensor) Llama from a local Hugging Face checkpoint, each rank reading only its own slices.

A Hugging Face directory holds `model.safetensors`, or `model.safetensors.index.json` naming the shard files.
safetensors files are memory-mapped and sliceable: for every parameter a rank reads exactly the rows (in general
the index box) of its local shard, in the checkpoint's dtype, and copies them into its local tensor, converting
to the parameter's dtype (Llama-3's bf16 release -> fp32 master weights). No rank ever allocates a full
parameter, let alone the whole model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import GenerationConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from prolong_lit.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_files(checkpoint_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint directory."""
    path = Path(checkpoint_dir).expanduser()
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    raise MissingPathError(
        f"model.llama.name_or_path: {str(path)!r} holds no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; sharded "
        "loading reads "
        "safetensors checkpoints only (save the model with save_pretrained)"
    )


def materialize(model: nn.Module, param_device: torch.device, buffer_device: torch.device) -> None:
    """Allocate a meta-device model's (local shards of) parameters on `param_device`, uninitialised, and rebuild
    its RoPE buffers (computed from the config, never saved in a checkpoint) on `buffer_device`."""
    model.to_empty(device=param_device)
    llama = model.model
    llama.rotary_emb = LlamaRotaryEmbedding(config=llama.config).to(buffer_device)
    # any other buffer would hold uninitialised memory: checkpoints restore parameters only
    unknown = [name for name, _ in model.named_buffers() if not name.startswith("model.rotary_emb.")]
    if unknown:
        raise RuntimeError(f"sharded loading cannot initialise the buffers {unknown[:5]} of this model")


@torch.no_grad()
def load_hf_weights(model: nn.Module, checkpoint_dir: str | Path) -> int:
    """Copy a Hugging Face checkpoint's tensors into `model`'s parameters (DTensor shards or plain tensors);
    returns the number of elements this rank read. Every parameter must be in the checkpoint, with its shape."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    read = 0
    for file in checkpoint_files(checkpoint_dir):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                param = params.get(name)
                if param is None:
                    unexpected.append(name)
                    continue
                read += _copy_local_slice(param, handle.get_slice(name), name, file)
                loaded.add(name)
    missing = sorted(params.keys() - loaded)
    if missing:
        raise ConfigError(
            f"model.llama.name_or_path: the checkpoint {str(checkpoint_dir)!r} lacks {len(missing)} weights of the "
            "model, "
            f"e.g. {missing[:3]} (model.llama.overrides that change the architecture cannot apply to a checkpoint)"
        )
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model has no parameter for, e.g. %s",
                    len(unexpected), unexpected[:3])
    _load_generation_config(model, checkpoint_dir)
    return read


def _copy_local_slice(param: torch.Tensor, source, name: str, file: Path) -> int:
    """Copy the part of the checkpoint tensor `source` (a safetensors slice) that this rank holds of `param`."""
    global_shape = tuple(source.get_shape())
    if global_shape != tuple(param.shape):
        raise ConfigError(
            f"model.llama.name_or_path: {name} is {global_shape} in {file.name} but {tuple(param.shape)} in the "
            "model built "
            "from its config (check model.llama.overrides)"
        )
    if isinstance(param, DTensor):
        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not the expected {tuple(shape)}")
    else:
        local, shape, offset = param, global_shape, (0,) * len(global_shape)
    if local.numel() == 0:  # a rank past the end of an unevenly sharded dimension
        return 0
    box = tuple(slice(start, start + size) for start, size in zip(offset, shape))
    local.copy_(source[box])  # (local shape) read from the memory-mapped file, cast to the parameter's dtype
    return local.numel()


def _load_generation_config(model: nn.Module, checkpoint_dir: str | Path) -> None:
    # from_pretrained would read it; generation (long-context evals) stops at the checkpoint's own eos ids
    if (Path(checkpoint_dir).expanduser() / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(checkpoint_dir), local_files_only=True)
