"""Chat conversations -> token ids and a loss mask on the assistant tokens, through the tokenizer's chat template.

The mask comes from token boundaries that the template itself produces, never from searching decoded text.
With render(m) = `apply_chat_template(m, tokenize=True)`:

- message i ends where render(messages[:i+1]) ends;
- assistant message i starts where render(messages[:i], add_generation_prompt=True) ends. The generation prompt
  (Llama-3: `<|start_header_id|>assistant<|end_header_id|>\\n\\n`) is what the model is given at inference, so it
  is prompt, not target.

So an assistant message's loss tokens are its content plus whatever the template closes it with, up to the next
message. For Llama-3 that is the content tokens and `<|eot_id|>`, the token generation must learn to stop on.
BOS, the system and user messages and every header get mask 0.

Each of these renders must be a token prefix of the whole conversation's render (the template must be
prefix-stable). A template that is not, for example one that rewrites earlier turns depending on what follows,
raises an error: the code does not guess.

A conversation whose source sets `loss_on: all` trains on every token (ProLong's stage scripts train on Tulu-v2
so): it is rendered once and carries no mask, like a text document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from prolong_lit.data.sources import CHAT_SOURCE_TYPES, Conversation, SourceConfig, iter_documents
from prolong_lit.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ASSISTANT = "assistant"


def check_chat_template(tokenizer: PreTrainedTokenizerBase, name: str, needed_by: str) -> None:
    """Raise an error naming the `tokenizer` setting if the tokenizer has no chat template.

    Args:
        tokenizer: the loaded tokenizer.
        name: the configured tokenizer (a directory or `llama3`), for the message.
        needed_by: the setting that needs a template (e.g. `domains.ultrachat`), for the message.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"tokenizer: {name!r} has no chat template (tokenizer.chat_template is None), which {needed_by} needs "
            "to render conversations; use the tokenizer directory of a chat model (e.g. Meta-Llama-3-8B-Instruct), "
            "or add a chat_template.jinja to it"
        )


def check_chat_sources(
    tokenizer: PreTrainedTokenizerBase, name: str, sources: Sequence[SourceConfig], setting: str
) -> None:
    """Before any work: a domain (`setting`, e.g. `domains.ultrachat`) with chat sources needs a chat template
    that renders and masks the first conversation of each of them."""
    chat_sources = [(i, source) for i, source in enumerate(sources) if source.type in CHAT_SOURCE_TYPES]
    if chat_sources:
        check_chat_template(tokenizer, name, needed_by=f"{setting} (chat sources)")
    for i, source in chat_sources:
        first = next(iter_documents(source, f"{setting}.sources[{i}]"))
        render_conversation(tokenizer, first)


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation
) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids (int32) of the whole conversation as the chat template renders it, and its loss mask (uint8,
    1 on assistant tokens: see the module docstring), or None when `conversation.loss_on` is `all` (every token
    trains)."""
    messages, where = conversation.messages, conversation.where
    if conversation.loss_on == "all":
        return np.asarray(_render(tokenizer, [messages], False, where)[0], np.int32), None
    assistant = [i for i, message in enumerate(messages) if message["role"] == ASSISTANT]
    if assistant and assistant[0] == 0:
        raise DataError(f"{where}: the conversation opens with an assistant message; nothing prompts it")
    # renders of messages[:1], ..., messages[:n] (the last is the whole conversation), then the prompts
    ends_renders = _render(tokenizer, [messages[: i + 1] for i in range(len(messages))], False, where)
    full = ends_renders[-1]
    ends = [_prefix_length(r, full, where, f"messages[:{i + 1}]") for i, r in enumerate(ends_renders)]
    mask = np.zeros(len(full), np.uint8)
    if assistant:
        starts_renders = _render(tokenizer, [messages[:i] for i in assistant], True, where)
        for i, render in zip(assistant, starts_renders):
            start = _prefix_length(render, full, where, f"messages[:{i}] with the generation prompt")
            if not ends[i - 1] <= start <= ends[i]:
                raise DataError(
                    f"tokenizer: the chat template's generation prompt after messages[:{i}] of {where} ends at "
                    f"token {start}, outside message {i} (tokens {ends[i - 1]}..{ends[i]}); the assistant tokens "
                    "cannot be located from token boundaries"
                )
            mask[start : ends[i]] = 1
    return np.asarray(full, np.int32), mask


def _render(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict]], generation_prompt: bool, where: str
) -> list[list[int]]:
    from jinja2 import TemplateError

    try:
        rendered = tokenizer.apply_chat_template(
            list(conversations), tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        )
    except (TemplateError, ValueError, TypeError, KeyError) as err:  # e.g. a template's raise_exception()
        raise DataError(f"{where}: the tokenizer's chat template failed on this conversation: {err}") from err
    return [list(ids) for ids in rendered]


def _prefix_length(tokens: list[int], full: list[int], where: str, what: str) -> int:
    if full[: len(tokens)] != tokens:
        raise DataError(
            f"tokenizer: the chat template is not prefix-stable on {where}: {what} renders to tokens that are not "
            "a prefix of the whole conversation's, so the assistant tokens cannot be located from token "
            "boundaries; use a template that renders earlier turns the same whatever follows"
        )
    return len(tokens)


__all__ = ["check_chat_sources", "check_chat_template", "render_conversation"]
