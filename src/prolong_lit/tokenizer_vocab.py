"""The vocabulary size of a Hugging Face `tokenizer.json`, read without building the tokenizer.

`prepare` in mode rows only checks stored token ids against the tokenizer's size, and loading Llama-3's tokenizer
(importing transformers, building its 280,000 BPE merges) takes ~2 s, most of a 1 GB conversion. The size a fast
tokenizer reports, `len(tokenizer)` = the Rust tokenizer's `get_vocab_size(with_added_tokens=True)`, is the number
of distinct token strings in the model's vocabulary and the added tokens together (an added token that is also in
the model's vocabulary, as BERT's [CLS], counts once). Both lists come before the merges in the file
(`added_tokens`, then `model`, whose `vocab` precedes `merges`), so the file is decoded only up to the end of the
vocabulary (~0.1 s for Llama-3's 17 MB). A file laid out otherwise is read by the tokenizers library, which gives
the same number more slowly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Layout(Exception):
    """The file is not laid out as this reader expects (it then asks the tokenizers library)."""


class NotATokenizer(ValueError):
    """The file is not a tokenizer the tokenizers library reads."""


def vocabulary_size_of(tokenizer_json: str | Path) -> int:
    """len(tokenizer) of the fast tokenizer `tokenizer_json` describes; NotATokenizer for a file that is none."""
    try:
        text = Path(tokenizer_json).read_bytes().decode("utf-8")  # bytes, then decode: text mode is 4x slower here
    except UnicodeDecodeError as err:
        raise NotATokenizer(f"{tokenizer_json} is not UTF-8 text ({err})") from err
    try:
        added, vocab = _added_tokens_and_vocab(text)
    except (_Layout, ValueError, IndexError, KeyError, TypeError):
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
        except Exception as err:  # the Rust library raises a bare Exception for a malformed file
            raise NotATokenizer(f"{tokenizer_json} is not a tokenizer the tokenizers library reads ({err})") from err
    names = set(vocab) if isinstance(vocab, dict) else {piece for piece, _score in vocab}  # Unigram: a list
    return len(names | {token["content"] for token in added})


def _added_tokens_and_vocab(text: str) -> tuple[list[dict], Any]:
    """The top-level `added_tokens` list and `model.vocab`, decoding nothing after the vocabulary."""
    added, at = None, _first_member(text, 0)
    while at is not None:
        key, value_at = _member(text, at)
        if key == "model":
            if added is None:  # added tokens after the model: not the layout tokenizers writes
                raise _Layout(key)
            return added, _model_vocab(text, value_at)
        value, end = _DECODER.raw_decode(text, value_at)
        if key == "added_tokens":
            added = value
        at = _next_member(text, end)
    raise _Layout("no model")


def _model_vocab(text: str, model_at: int) -> Any:
    at = _first_member(text, model_at)
    while at is not None:
        key, value_at = _member(text, at)
        if key == "merges":  # merges before the vocabulary
            raise _Layout(key)
        value, end = _DECODER.raw_decode(text, value_at)
        if key == "vocab":
            if not isinstance(value, dict | list):
                raise _Layout(key)
            return value
        at = _next_member(text, end)
    raise _Layout("a model without vocab")


def _first_member(text: str, i: int) -> int | None:
    """Where the first key of the JSON object at text[i] starts, None for an empty object."""
    i = _SPACE.match(text, i).end()
    if text[i] != "{":
        raise _Layout("not an object")
    i = _SPACE.match(text, i + 1).end()
    return None if text[i] == "}" else i


def _member(text: str, i: int) -> tuple[str, int]:
    """(key, where its value starts) of the member at text[i]."""
    key, i = _DECODER.raw_decode(text, i)
    i = _SPACE.match(text, i).end()
    if text[i] != ":":
        raise _Layout("no colon after a key")
    return key, _SPACE.match(text, i + 1).end()


def _next_member(text: str, end: int) -> int | None:
    """Where the next member starts after a value ending at `end`, None at the object's end."""
    i = _SPACE.match(text, end).end()
    if text[i] == "}":
        return None
    if text[i] != ",":
        raise _Layout("no comma between members")
    return _SPACE.match(text, i + 1).end()
