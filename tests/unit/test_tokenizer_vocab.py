"""tokenizer.vocabulary_size (prepare's size check for already tokenized data) against len() of the tokenizer
transformers loads from the same directory, for the layouts tokenizers writes and for ones it does not."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prolong_lit.tokenizer import load_tokenizer, vocabulary_size
from prolong_lit.tokenizer_vocab import vocabulary_size_of


def save(tmp_path, backend: Tokenizer, name: str, **special) -> str:
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / name
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(str(folder))
    return str(folder)


def bpe(tmp_path) -> str:
    vocab = {c: i for i, c in enumerate("abcdefgh")} | {"ab": 8, "abc": 9}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    backend.add_special_tokens(["<s>", "</s>"])
    backend.add_tokens(["hello", "abc"])  # "abc" is in the model's vocabulary already: counted once
    return save(tmp_path, backend, "bpe", bos_token="<s>", eos_token="</s>")


def wordpiece(tmp_path) -> str:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "##s", "cat"])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.add_special_tokens(["[CLS]", "[SEP]", "[PAD]", "[MASK]"])  # three in the vocabulary, [MASK] new
    return save(tmp_path, backend, "wordpiece", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")


def unigram(tmp_path) -> str:
    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -1.5)], unk_id=0))
    backend.add_special_tokens(["<pad>", "<unk>"])
    return save(tmp_path, backend, "unigram", pad_token="<pad>", unk_token="<unk>")


@pytest.mark.parametrize("make", [bpe, wordpiece, unigram])
def test_vocabulary_size_is_len_of_the_loaded_tokenizer(tmp_path, make):
    folder = make(tmp_path)
    assert vocabulary_size(folder) == len(load_tokenizer(folder))


def test_llama3(llama3_tokenizer_dir):
    assert vocabulary_size(str(llama3_tokenizer_dir)) == len(load_tokenizer(str(llama3_tokenizer_dir))) == 128256


@pytest.mark.parametrize("layout", ["indented", "added_tokens_last", "merges_first"])
def test_other_layouts_give_the_same_size(tmp_path, layout):
    folder = tmp_path / "bpe"
    data = json.loads((tmp_path.joinpath(bpe(tmp_path)) / "tokenizer.json").read_text())
    if layout == "added_tokens_last":
        data["added_tokens"] = data.pop("added_tokens")
    if layout == "merges_first":
        model = data["model"]
        data["model"] = {"merges": model.pop("merges"), **model}
    path = folder / f"{layout}.json"
    path.write_text(json.dumps(data, indent=2 if layout == "indented" else None))
    assert vocabulary_size_of(path) == Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True) == 13


def test_a_missing_directory_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^tokenizer: tokenizer directory '.*nowhere' does not exist"):
        vocabulary_size(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("content", [b'{"model": {"type": "BPE"}}', b"not json", b"\xff\xfe"])
def test_a_file_that_is_no_tokenizer_is_a_config_error_naming_the_setting(tmp_path, content):
    from prolong_lit.errors import ConfigError

    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"^tokenizer: .*tokenizer.json is not .*; give a Hugging Face tokenizer"):
        vocabulary_size(str(tmp_path))
