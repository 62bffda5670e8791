"""Documents tokenized by worker processes, in input order (prepare's text and chat domains).

Documents go to the workers in batches (BATCH_DOCS, or fewer when long: BATCH_CHARS); each worker holds the
tokenizer and the end-of-document id as module-level state, set once by the pool's initializer. Texts get BOS from
the tokenizer and `eos_id` appended; conversations get their chat-template rendering and assistant-token mask
(chat.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from prolong_lit.data.chat import render_conversation
from prolong_lit.data.pool import ordered_map
from prolong_lit.data.sources import Conversation

BATCH_DOCS = 64  # documents per tokenization task
BATCH_CHARS = 4_000_000  # ... or fewer, when they are long (whole repositories)

_TOKENIZER = None
_EOS_ID: int | None = None


def _init_worker(tokenizer, eos_id: int | None) -> None:
    global _TOKENIZER, _EOS_ID
    _TOKENIZER, _EOS_ID = tokenizer, eos_id


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
    if not texts:
        return []
    encoded = _TOKENIZER(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]
    out = []
    for ids in encoded:
        if _EOS_ID is not None and (not ids or ids[-1] != _EOS_ID):
            ids.append(_EOS_ID)
        out.append(np.asarray(ids, np.int32))
    return out


def _encode(documents: list[str | Conversation]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids, loss mask or None) of each document: texts in one tokenizer call, conversations rendered."""
    texts = iter(_encode_texts([doc for doc in documents if isinstance(doc, str)]))
    return [(next(texts), None) if isinstance(doc, str) else render_conversation(_TOKENIZER, doc) for doc in documents]


def _batches(documents: Iterable[str | Conversation]) -> Iterator[list[str | Conversation]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc) if isinstance(doc, str) else doc.num_chars
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_documents(
    documents: Iterable[str | Conversation], tokenizer, eos_id: int | None, num_workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids, loss mask or None) of each document, in input order, tokenized by `num_workers` processes.
    Conversations get their chat-template rendering and assistant-token mask (see `chat.py`)."""
    for encoded in ordered_map(_encode, _batches(documents), num_workers, window=4, initializer=_init_worker,
                               initargs=(tokenizer, eos_id)):
        yield from encoded
