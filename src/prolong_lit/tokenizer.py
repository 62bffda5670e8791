"""Tokenizers: load any local Hugging Face tokenizer directory, or build the real Llama-3 one offline.

Meta's `llama-models` package ships the Llama-3 BPE ranks (`llama_models/llama3/tokenizer.model`, the tiktoken
format). transformers' `TikTokenConverter` turns them into a fast tokenizer whose ids match Meta's exactly, so
the demo and the tests run on the real 128,256-token vocabulary without touching the network.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from prolong_lit.errors import ConfigError, MissingPathError
from prolong_lit.tokenizer_vocab import NotATokenizer, vocabulary_size_of

if TYPE_CHECKING:  # transformers is imported where a tokenizer is built or loaded: `vocabulary_size` needs neither
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# The Llama-3 Instruct chat template (as in Meta-Llama-3-8B-Instruct's tokenizer_config.json). Each message is
# `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`; the generation prompt opens an assistant turn.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def default_cache_dir() -> Path:
    """Where built artefacts (the Llama-3 tokenizer) live: `$PROLONG_LIT_CACHE` or `~/.cache/prolong_lit`."""
    return Path(os.environ.get("PROLONG_LIT_CACHE", Path.home() / ".cache" / "prolong_lit"))


def default_llama3_tokenizer_dir() -> Path:
    return default_cache_dir() / "llama3-tokenizer"


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens in id order (ids 128000..128255)."""
    named = list(LLAMA3_NAMED_SPECIAL_TOKENS)
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - len(named))]
    return named + reserved


def build_llama3_tokenizer(output_dir: str | Path, overwrite: bool = False, setting: str = "--output") -> Path:
    """Build the Llama-3 (Instruct) tokenizer from `llama-models`' BPE ranks into `output_dir`.

    Skips the work when `output_dir` already holds a tokenizer, unless `overwrite`. The files are written beside
    it first and moved in, tokenizer.json last, so a full disk or a kill never leaves a tokenizer.json that
    looks built; an OSError (a full or read-only disk) is a ConfigError naming `setting` and the path.
    """
    output_dir = Path(output_dir)
    if (output_dir / "tokenizer.json").exists() and not overwrite:
        log.info("Llama-3 tokenizer already built at %s", output_dir)
        return output_dir
    existing = next(folder for folder in (output_dir, *output_dir.parents) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # before the ~10 s build (a read-only mount says so too)
        raise ConfigError(f"{setting}: cannot write the tokenizer to {output_dir}: {existing} is not writable; "
                          "choose a writable folder")
    try:
        import llama_models.llama3
    except ImportError as err:  # pragma: no cover - llama-models is a hard dependency
        raise ImportError("building the Llama-3 tokenizer needs the `llama-models` package") from err
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = Path(llama_models.llama3.__file__).parent / "tokenizer.model"
    specials = llama3_special_tokens()
    backend = TikTokenConverter(
        vocab_file=str(ranks_file), pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    # BOS in front of every encoded text, as Meta's tokenizer.json does.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>"))],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",  # the Instruct release's end of turn, where generation stops
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    _check_llama3_ids(tokenizer)
    try:
        _save(tokenizer, output_dir)
    except OSError as err:
        raise ConfigError(f"{setting}: writing the tokenizer to {output_dir} failed: {err.strerror or err}; choose a "
                          "writable folder with room for it (~20 MB)") from err
    log.info("built the Llama-3 tokenizer (vocab %d) at %s", len(tokenizer), output_dir)
    return output_dir


def _save(tokenizer: PreTrainedTokenizerBase, output_dir: Path) -> None:
    """save_pretrained into a scratch folder beside `output_dir`, then each file moved in (tokenizer.json, the
    file that says a tokenizer is there, last); the scratch folder goes in any case."""
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = output_dir.parent / f".{output_dir.name}.saving-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        try:
            tokenizer.save_pretrained(str(scratch))
        except Exception as err:  # the Rust tokenizers library reports an I/O error as "... (os error N)"
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(scratch / "tokenizer.json")) from err
        for path in sorted(scratch.iterdir(), key=lambda path: path.name == "tokenizer.json"):
            os.replace(path, output_dir / path.name)
    except BaseException:
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_llama3_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eot_id|>": 128009,
    }
    for token, token_id in expected.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise RuntimeError(f"Llama-3 tokenizer build is wrong: {token} has id {got}, expected {token_id}")
    if len(tokenizer) != 128256:
        raise RuntimeError(f"Llama-3 tokenizer build is wrong: vocab {len(tokenizer)}, expected 128256")


def tokenizer_dir(path: str | Path, setting: str = "tokenizer") -> Path:
    """The local directory a tokenizer setting names; `llama3` means the offline-built Llama-3 tokenizer (built
    on first use). `setting` names the config key in the error raised when the directory is missing."""
    if str(path) == "llama3":
        path = default_llama3_tokenizer_dir()
        if not (path / "tokenizer.json").exists():
            build_llama3_tokenizer(path, setting=f"{setting} (llama3, built into {path})")
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(
            f"{setting}: tokenizer directory {str(path)!r} does not exist "
            "(give a local Hugging Face tokenizer directory, or `llama3` for the built-in Llama-3 tokenizer)"
        )
    return path


def load_tokenizer(path: str | Path, setting: str = "tokenizer") -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, or `llama3` (see tokenizer_dir)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(path, setting)), local_files_only=True)


def vocabulary_size(path: str | Path, setting: str = "tokenizer") -> int:
    """len(load_tokenizer(path)) without loading it, from the directory's tokenizer.json (~0.1 s for Llama-3's,
    where importing transformers and loading take ~2 s): what `prepare` needs of a tokenizer for data that is
    already tokenized. A directory without tokenizer.json (a slow tokenizer) is loaded."""
    directory = tokenizer_dir(path, setting)
    if not (directory / "tokenizer.json").is_file():
        return len(load_tokenizer(directory, setting))
    try:
        return vocabulary_size_of(directory / "tokenizer.json")
    except NotATokenizer as err:
        raise ConfigError(f"{setting}: {err}; give a Hugging Face tokenizer directory") from err
