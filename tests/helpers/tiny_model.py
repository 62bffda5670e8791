"""The tiny Llama the model-level unit tests share, and transformers' eager Llama as their independent reference."""

from __future__ import annotations

import copy

from transformers import LlamaForCausalLM

VOCAB = 512
# Small vocabulary keeps the tests fast; bos/eos moved inside it to keep transformers quiet.
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}


def eager_copy(module) -> LlamaForCausalLM:
    """transformers' own eager Llama with the module's (a LongContextLM's) weights: the independent reference."""
    config = copy.deepcopy(module.model.config)
    config._attn_implementation = "eager"
    reference = LlamaForCausalLM(config)
    reference.load_state_dict(module.model.state_dict())
    return reference.eval()
