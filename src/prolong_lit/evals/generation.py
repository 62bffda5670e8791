"""Greedy decoding for evaluation: batched with left padding, with or without a KV cache.

With `use_cache=True` each batch is prefilled once (`use_cache=True` passed explicitly: the training config has
`use_cache=False`) and then decoded one token at a time from the cache. With `use_cache=False` every step runs the
whole sequence again; it exists so a benchmark can measure what the cache saves, and as the reference the cached
path is tested against. Both compute logits for the last position only (`logits_to_keep=1`), so a 512K-token
prompt never materialises a `[L, vocab]` tensor.

Padding is on the left with an `attention_mask`, and `position_ids` count real tokens only (a padded row sees
the same positions as the row alone). A row stops at EOS or, with `stop_newline`, at any token whose text holds a
newline; the newline token is kept in the output, EOS is not.

Lockstep. Under FSDP every rank must run the same number of forward passes. With `lockstep=True` the ranks agree
on the number of batches (a rank with fewer runs dummy batches) and keep stepping until every rank's batch is done.
It costs one scalar all-reduce per step and is needed whenever parameters are sharded; keep it off when a single
rank evaluates alone.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedTokenizerBase

from prolong_lit.evals import distributed as ev_dist

_NEWLINE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class GenerationStats:
    """What generation cost; the benchmark compares these between `use_cache=True` and `False`."""

    sequences: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_calls: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    use_cache: bool = True

    def add(self, other: GenerationStats) -> None:
        for name in ("sequences", "prompt_tokens", "generated_tokens", "forward_calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.prefill_seconds += other.prefill_seconds
        self.decode_seconds += other.decode_seconds

    def as_dict(self) -> dict:
        return asdict(self)


def newline_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of every token whose text contains a newline (byte-level `Ċ`, SentencePiece `<0x0A>`, or `\\n`)."""
    try:
        return _NEWLINE_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ids = frozenset(
        i for i, tok in enumerate(tokens) if tok is not None and ("Ċ" in tok or "\n" in tok or tok == "<0x0A>")
    )
    try:
        _NEWLINE_IDS[tokenizer] = ids
    except TypeError:  # pragma: no cover - tokenizers are weak-referenceable
        pass
    return ids


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_newline: bool) -> frozenset[int]:
    """EOS (and `<|end_of_text|>`-style ends the tokenizer knows), plus the newline tokens if asked."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|end_of_text|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    if stop_newline:
        ids |= newline_token_ids(tokenizer)
    return frozenset(ids)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x names the forward's cache argument `cache` (earlier: `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def _forward(model, cache_kw: str, input_ids, attention_mask, position_ids, cache, use_cache: bool):
    kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": use_cache}
    if use_cache:
        kwargs[cache_kw] = cache
    # logits of the last position only: a long prompt never materialises (B, T, vocab)
    out = model(input_ids=input_ids, logits_to_keep=1, **kwargs)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits[:, -1, :], new_cache  # (B, V)


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def _generate_batch(
    model,
    cache_kw: str,
    batch: list[list[int]],
    real: list[bool],
    max_new_tokens: int,
    stop: torch.Tensor,
    pad_token_id: int,
    use_cache: bool,
    lockstep: bool,
    stats: GenerationStats,
) -> list[list[int]]:
    device = stop.device
    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long, device=device)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)  # (B, T)
    for row, prompt in enumerate(batch):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
        attention_mask[row, width - len(prompt) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T), real tokens count from 0
    finished = ~torch.tensor(real, dtype=torch.bool, device=device)  # (B,), dummy rows are done from the start
    generated: list[torch.Tensor] = []
    cache = None
    step_ids, step_positions = input_ids, position_ids  # the cached path feeds only the newest token
    start = _sync_time(device)
    for step in range(max_new_tokens):
        logits, cache = _forward(model, cache_kw, step_ids, attention_mask, step_positions, cache, use_cache)
        stats.forward_calls += 1
        next_token = torch.where(finished, pad_token_id, logits.argmax(dim=-1))  # (B,)
        generated.append(torch.where(finished, -1, next_token))
        finished |= torch.isin(next_token, stop)
        if step == 0:
            prefill_end = _sync_time(device)
            stats.prefill_seconds += prefill_end - start
        if not ev_dist.any_true(not bool(finished.all()), device, lockstep):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(batch), 1))], dim=1)  # (B, T+1)
        next_position = step_positions[:, -1:] + 1  # (B, 1)
        if use_cache:
            step_ids, step_positions = next_token[:, None], next_position
        else:  # run the whole sequence again
            step_ids = torch.cat([step_ids, next_token[:, None]], dim=1)  # (B, T + step + 1)
            step_positions = torch.cat([step_positions, next_position], dim=1)
    if max_new_tokens > 0:
        stats.decode_seconds += _sync_time(device) - prefill_end
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in batch]  # (B, steps)
    out = []
    for row, is_real in enumerate(real):
        if is_real:
            ids = [t for t in tokens[row] if t != -1]
            out.append(ids)
            stats.sequences += 1
            stats.prompt_tokens += len(batch[row])
            stats.generated_tokens += len(ids)
    return out


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] | frozenset[int],
    pad_token_id: int,
    batch_size: int = 1,
    use_cache: bool = True,
    lockstep: bool = False,
) -> tuple[list[list[int]], GenerationStats]:
    """Greedy continuations of `prompts` (token id lists), in the order given, and what they cost.

    Each continuation ends with its stop token if it stopped on one (EOS ids included, so decode with
    `skip_special_tokens=True`). Prompts are batched `batch_size` at a time, longest first, to limit padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: an empty prompt cannot be continued")
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    cache_kw = _cache_kwarg(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    num_batches = ev_dist.max_int(len(batches), device, lockstep)
    stats = GenerationStats(use_cache=use_cache)
    outputs: list[list[int] | None] = [None] * len(prompts)
    for b in range(num_batches):
        if b < len(batches):
            idx = batches[b]
            batch, real = [list(prompts[i]) for i in idx], [True] * len(idx)
        else:  # this rank ran out of work but the others still need its forward passes
            idx, batch, real = [], [[pad_token_id]], [False]
        results = _generate_batch(
            model, cache_kw, batch, real, max_new_tokens, stop, pad_token_id, use_cache, lockstep, stats
        )
        for i, ids in zip(idx, results):
            outputs[i] = ids
    return [o if o is not None else [] for o in outputs], stats
