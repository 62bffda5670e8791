"""Named model sizes: the one lookup table of the project (`model.llama.name_or_path: tiny`).

Each entry is a set of `transformers.LlamaConfig` arguments. `llama3-8b` is exactly Meta-Llama-3-8B's
architecture (its config.json), for training from scratch or checking shapes; the recipe itself starts from a
local Hugging Face checkpoint directory, which `model.llama.name_or_path` also accepts.
"""

from __future__ import annotations

from typing import Any

from prolong_lit.errors import ConfigError

# Llama-3's tokenizer: 128,000 BPE tokens + 256 special tokens; BOS <|begin_of_text|>, EOS <|end_of_text|>.
LLAMA3_VOCAB_SIZE = 128_256
LLAMA3_BOS_TOKEN_ID = 128_000
LLAMA3_EOS_TOKEN_ID = 128_001

_LLAMA3_COMMON: dict[str, Any] = {
    "vocab_size": LLAMA3_VOCAB_SIZE,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500_000.0,
    "max_position_embeddings": 8192,
    "initializer_range": 0.02,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": LLAMA3_BOS_TOKEN_ID,
    "eos_token_id": LLAMA3_EOS_TOKEN_ID,
}

SIZES: dict[str, dict[str, Any]] = {
    # Demo and tests: Llama-3-shaped (real vocabulary, GQA with 2 query heads per kv head, untied head), ~16.5M
    # parameters of which all but ~0.1M are the embedding and the LM head.
    "tiny": {
        **_LLAMA3_COMMON,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    # Meta-Llama-3-8B (and -Instruct): 32 layers, 32 query heads, 8 kv heads, head_dim 128.
    "llama3-8b": {
        **_LLAMA3_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}


def known_sizes() -> list[str]:
    """The size names `model.llama.name_or_path` accepts besides a checkpoint directory."""
    return sorted(SIZES)


def size_config_kwargs(name: str) -> dict[str, Any]:
    """A copy of the LlamaConfig arguments of size `name`; a clear error for an unknown name."""
    if name not in SIZES:
        raise ConfigError(
            f"model.llama.name_or_path: {name!r} is neither a known size ({', '.join(known_sizes())}) nor a local "
            "Hugging Face checkpoint directory (a directory holding config.json)"
        )
    return dict(SIZES[name])
