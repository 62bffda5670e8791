"""`prepare(config)`: raw documents -> tokenized, filtered, packed litdata shards, one directory per domain.

Its command line is `python -m prolong_lit prepare --config configs/data/demo.yaml` (`prolong_lit.commands.prepare`;
the arguments are parsed here, by `parse_config`, which a pipeline phase's `prepare:` list also goes through).
Every setting is checked (sources exist and hold documents, the tokenizer loads, the output directory is free)
before any work. Documents are tokenized in a process pool (ordered, so the result does not depend on the
number of workers), filtered by length, stored in scratch token files beside the output, planned into
samples (see `packing.py`), and only then written: the old output (with --overwrite) is removed, each domain is
written by litdata's writer in this process, in order (write.py), and `manifest.json` comes last. The same input and
settings give the same bytes in every output file. Chat sources (mode sft) are rendered with the tokenizer's
chat template and carry a loss mask on the assistant tokens (see `chat.py`; none with `loss_on: all`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from prolong_lit.data.chat import check_chat_sources
from prolong_lit.data.format import MANIFEST_NAME, DomainStats, Manifest
from prolong_lit.data.packing import (
    MODES,
    TokenStore,
    check_lengths,
    length_limits,
    max_token_id,
    plan_samples,
)
from prolong_lit.data.rows import MDS_SOURCE, ROWS_MODE, RowStore, build_rows_domain, check_rows_domain
from prolong_lit.data.sources import CHAT_SOURCE_TYPES, SourceConfig, iter_documents, validate_source
from prolong_lit.data.tokenize import tokenize_documents
from prolong_lit.data.verify import INCOMPLETE_MARKER
from prolong_lit.data.write import disk_errors, scratch_folder, write_domain
from prolong_lit.errors import ConfigError, DataError

if TYPE_CHECKING:  # jsonargparse runs this block when it reads PrepareConfig's annotations: nothing heavy here
    from jsonargparse import ArgumentParser

log = logging.getLogger(__name__)

LLAMA3_EOS = "<|end_of_text|>"
# INCOMPLETE_MARKER (verify.py): written into output_dir while domains are being written, removed once the
# manifest is: a directory holding it (or a manifest) is ours to replace with --overwrite.


@dataclass
class DomainConfig:
    """One domain: where its documents come from and how they are packed.

    Args:
        sources: the raw document sources, read in order.
        mode: `slice` (long data: each sample is a slice of one document, remainders dropped), `slice_pack`
            (long data packed shorter: each document cut into consecutive `slice_length` slices, remainders
            dropped, each slice its own document; the slices shuffled with the seed and packed
            seq_len / slice_length per sample; the slices left over for a final partial sample are dropped),
            `concat` (short data: documents shuffled with the seed, concatenated and cut; a cut tail starts the
            next sample; the final partial sample is dropped) or `sft` (chat sources only: conversations
            shuffled with the seed and concatenated, with a loss mask on assistant tokens; the conversation that
            does not fit fills the sample with its prefix and the rest is discarded; conversations longer than
            seq_len are dropped and counted as documents.dropped_too_long). Chat sources may also feed a concat
            domain (their loss mask rides along), not a slice or slice_pack one. Tokens dropped are counted per
            cause in the manifest's dropped_tokens. Mode `rows` reads `mds` sources only (ProLong's released
            data, already tokenized and packed): every stored row becomes one sample as it is (see rows.py).
        min_length: drop documents with fewer tokens (BOS/EOS included). Default: seq_len for slice,
            slice_length for slice_pack, 1 for concat and sft. In slice (slice_pack) mode it must be at least
            seq_len (slice_length): a shorter document gives no slice.
        max_length: drop documents with more tokens, counted as documents.dropped_too_long (default: no limit;
            seq_len in sft mode, where it may not exceed seq_len). E.g. slice_pack with slice_length 65536 and
            max_length 524287 keeps the 64K..512K documents: disjoint from a slice domain of min_length 524288.
        slice_length: the slice length of mode slice_pack (required there, unused elsewhere); seq_len must be a
            multiple of it.
    """

    sources: list[SourceConfig]
    mode: str = "concat"
    min_length: int | None = None
    max_length: int | None = None
    slice_length: int | None = None


@dataclass
class PrepareConfig:
    """What to build.

    Args:
        tokenizer: a local Hugging Face tokenizer directory, or `llama3` for the built-in Llama-3 tokenizer.
        output_dir: the prepared data directory (manifest.json + one litdata directory per domain).
        domains: domain name -> how to build it (the name is the directory name).
        seq_len: the packing length: tokens per sample.
        num_workers: tokenization processes (mode rows: shard-reading processes; 0 or 1: in this process).
        seed: seeds the shuffle of documents in concat and sft domains (of slices in slice_pack domains).
        append_eos: append `eos_token` where each text document ends (BOS is whatever the tokenizer adds
            itself). Conversations end as the chat template ends them (Llama-3: `<|eot_id|>`).
        eos_token: the end-of-document token; default `<|end_of_text|>` when the tokenizer has it (Llama-3),
            else the tokenizer's eos_token.
        chunk_bytes: litdata chunk file size.
        paths: free-form named settings that the rest of the file refers to as `${paths.<name>}` (the data
            spec is read in omegaconf mode), so a config names a location once (e.g. `paths: {prolong_64k:
            /data/prolong-data-64K}` and `path: ${paths.prolong_64k}/book-65536`). Not read by `prepare`
            itself. References are resolved when the file is read: a `--paths.<name>` flag after `--config`
            does not move them; edit the file (or pass a second `--config` holding the whole data spec).
    """

    tokenizer: str
    output_dir: str
    domains: dict[str, DomainConfig]
    seq_len: int = 65536
    num_workers: int = 2
    seed: int = 42
    append_eos: bool = True
    eos_token: str | None = None
    chunk_bytes: str = "64MB"
    paths: dict[str, str] = field(default_factory=dict)


@dataclass
class _Built:
    """One domain, tokenized and planned, not yet written."""

    store: TokenStore | RowStore
    plan: list[np.ndarray]
    stats: DomainStats


def prepare(config: PrepareConfig, overwrite: bool = False) -> Manifest:
    """Build the prepared data directory described by `config`; returns its manifest.

    Scratch files live in a fixed folder beside the output (`write.scratch_path`), removed at the end, on an
    error, and by the next run when a kill left it. The output is marked incomplete (INCOMPLETE_MARKER) while it
    is written: a failure removes it, a kill leaves it marked, and neither `fit` nor a rerun without --overwrite
    takes it for data. A full or read-only disk is an error naming the file, not a library's traceback."""
    tokenization = validate(config, overwrite)
    out = Path(config.output_dir)
    with disk_errors(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_folder(out) as scratch:
        with disk_errors(scratch):  # the token files, a rows domain's chunks
            built = {name: _build_domain(name, config, tokenization, scratch) for name in sorted(config.domains)}
        manifest = Manifest(
            tokenizer=config.tokenizer,
            vocab_size=tokenization.vocab_size,
            seq_len=config.seq_len,
            domains={name: domain.stats for name, domain in built.items()},
        )
        _write_output(out, built, config)
        with disk_errors(out):
            manifest.write(out)
            (out / INCOMPLETE_MARKER).unlink()
    log.info("prepared %s: %s", out, {n: (d.samples, d.tokens) for n, d in manifest.domains.items()})
    return manifest


def _write_output(out: Path, built: dict[str, _Built], config: PrepareConfig) -> None:
    """Replace `out` (validate() allowed it: --overwrite and ours) by the built domains, marked incomplete until
    the manifest is written; on a failure the partial output goes (it would only fill the disk)."""
    with disk_errors(out):
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        (out / INCOMPLETE_MARKER).touch()
    try:
        for name, domain in built.items():
            with disk_errors(out / name):
                if isinstance(domain.store, RowStore):  # mode rows: written already, in the scratch folder
                    domain.store.directory.rename(out / name)
                else:
                    write_domain(domain.store, domain.plan, config.seq_len, out / name, config.chunk_bytes)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


class Tokenization(NamedTuple):
    """What the domains need of the tokenizer."""

    tokenizer: Any  # a transformers PreTrainedTokenizerBase; None when no domain tokenizes (all mode rows)
    eos_id: int | None  # None without append_eos, or without a tokenizer
    vocab_size: int  # len(tokenizer)


def validate(config: PrepareConfig, overwrite: bool = False) -> Tokenization:
    """Check every setting before any work; returns what the domains need of the tokenizer. A configuration of
    mode rows domains only reads the tokenizer's size (tokenizer.vocabulary_size: ~0.1 s, not the ~2 s of
    loading transformers and the tokenizer): its data is tokenized already."""
    _check_output_dir(Path(config.output_dir), overwrite)
    if config.seq_len <= 0:
        raise ConfigError(f"seq_len: must be a positive number of tokens (got {config.seq_len})")
    if config.num_workers < 0:
        raise ConfigError(f"num_workers: must be >= 0 (got {config.num_workers})")
    if not re.fullmatch(r"\d+(\.\d+)?\s*([kmgt]b?|b)", config.chunk_bytes.strip().lower()):
        raise ConfigError(f"chunk_bytes: {config.chunk_bytes!r} is not a size like 64MB")
    if not config.domains:
        raise ConfigError("domains: no domain configured")
    for name, domain in config.domains.items():
        _check_domain(name, domain, config.seq_len)
    from prolong_lit.tokenizer import load_tokenizer, vocabulary_size

    if all(domain.mode == ROWS_MODE for domain in config.domains.values()):
        return Tokenization(None, None, vocabulary_size(config.tokenizer, setting="tokenizer"))
    tokenizer = load_tokenizer(config.tokenizer, setting="tokenizer")
    eos_id = _eos_id(tokenizer, config)
    for name, domain in config.domains.items():
        check_chat_sources(tokenizer, config.tokenizer, domain.sources, f"domains.{name}")
    return Tokenization(tokenizer, eos_id, len(tokenizer))


def _check_output_dir(out: Path, overwrite: bool) -> None:
    _check_writable(out)
    if not out.exists():
        return
    if not overwrite and (out / INCOMPLETE_MARKER).exists():
        raise DataError(f"output_dir: {str(out)!r} holds an incomplete preparation (a prepare that was interrupted "
                        f"or failed left it: {INCOMPLETE_MARKER}); it is not usable data: pass "
                        "--overwrite to prepare it again")
    if not overwrite:
        raise ConfigError(f"output_dir: {str(out)!r} already exists; pass --overwrite to replace it")
    ours = out.is_dir() and (
        not any(out.iterdir()) or (out / MANIFEST_NAME).exists() or (out / INCOMPLETE_MARKER).exists()
    )
    if not ours:
        raise ConfigError(
            f"output_dir: {str(out)!r} exists and is not a prepared data directory (no {MANIFEST_NAME}); "
            "refusing to delete it even with --overwrite; remove it yourself or choose another output_dir"
        )


def _check_writable(out: Path) -> None:
    """The output's parent (or its nearest existing ancestor), where the output and the scratch folder are made
    or replaced, accepts new files."""
    existing = next(folder for folder in out.parents if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "a read-only file system" if _read_only(existing) else "no write permission"
        raise DataError(f"output_dir: cannot write {str(out)!r}: {existing} is not writable ({reason}); choose "
                        "a writable output_dir")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_domain(name: str, domain: DomainConfig, seq_len: int) -> None:
    setting = f"domains.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
        raise ConfigError(f"{setting}: a domain name must be a plain directory name (letters, digits, _ . -)")
    if domain.mode not in (*MODES, ROWS_MODE):
        modes = ", ".join((*MODES, ROWS_MODE))
        raise ConfigError(f"{setting}.mode: unknown mode {domain.mode!r} (choose from {modes})")
    if domain.mode == ROWS_MODE or any(source.type == MDS_SOURCE for source in domain.sources):
        return check_rows_domain(setting, domain, seq_len)  # stored rows: none of the checks below apply
    check_lengths(setting, domain, seq_len)
    if not domain.sources:
        raise ConfigError(f"{setting}.sources: no source configured")
    for i, source in enumerate(domain.sources):
        if domain.mode == "sft" and source.type not in CHAT_SOURCE_TYPES:
            raise ConfigError(f"{setting}.sources[{i}].type: mode sft reads chat sources only (got {source.type})")
        if domain.mode in ("slice", "slice_pack") and source.type in CHAT_SOURCE_TYPES:
            raise ConfigError(
                f"{setting}.mode: a chat source (sources[{i}]) needs mode sft (or concat), not {domain.mode}"
            )
        validate_source(source, f"{setting}.sources[{i}]")


def _eos_id(tokenizer, config: PrepareConfig) -> int | None:
    if not config.append_eos:
        return None
    vocab = tokenizer.get_vocab()
    token = config.eos_token or (LLAMA3_EOS if LLAMA3_EOS in vocab else tokenizer.eos_token)
    if token is None:
        raise ConfigError("eos_token: the tokenizer defines no eos_token; set eos_token, or append_eos: false")
    if token not in vocab:
        raise ConfigError(f"eos_token: {token!r} is not a token of tokenizer {config.tokenizer!r}")
    return tokenizer.convert_tokens_to_ids(token)


def _build_domain(name: str, config: PrepareConfig, tokenization: Tokenization, scratch: Path) -> _Built:
    from tqdm import tqdm

    domain = config.domains[name]
    if domain.mode == ROWS_MODE:
        args = (config.seq_len, tokenization.vocab_size, config.num_workers, scratch, config.chunk_bytes)
        return _Built(*build_rows_domain(name, domain, *args))
    min_length, max_length = length_limits(domain, config.seq_len)
    store = TokenStore(scratch, name)
    read = dropped = too_long = 0
    decoding = Counter()  # undecodable bytes read as U+FFFD (sources with errors: replace)
    documents = (
        doc for i, source in enumerate(domain.sources)
        for doc in iter_documents(source, f"domains.{name}.sources[{i}]", decoding)
    )
    with tqdm(desc=f"tokenizing {name}", unit="doc", disable=None) as progress:
        for ids, mask in tokenize_documents(documents, tokenization.tokenizer, tokenization.eos_id,
                                            config.num_workers):
            read += 1
            progress.update()
            if len(ids) < min_length:
                dropped += 1
            elif max_length is not None and len(ids) > max_length:
                too_long += 1
            else:
                store.append(ids, mask)
    store.close()
    kept = read - dropped - too_long
    documents_stats = {"read": read, "kept": kept, "dropped_min_length": dropped}
    if max_length is not None:
        documents_stats["dropped_too_long"] = too_long
    if any(source.errors == "replace" for source in domain.sources):
        documents_stats.update(with_replaced_bytes=decoding["with_replaced_bytes"],
                               replaced_bytes=decoding["replaced_bytes"])
    plan, dropped_tokens = plan_samples(domain.mode, store, config.seq_len, config.seed, name, domain.slice_length)
    if not plan:
        raise ConfigError(
            f"domains.{name}: no sample of {config.seq_len} tokens (read {read} documents, kept {kept} of at least "
            f"{min_length}{f' and at most {max_length}' if max_length else ''} tokens, {store.num_tokens} tokens); "
            f"lower domains.{name}.min_length or seq_len, or add sources"
        )
    stats = DomainStats(
        samples=len(plan),
        tokens=len(plan) * config.seq_len,
        max_token_id=max_token_id(plan, store.tokens()),
        has_loss_mask=store.has_mask,
        documents=documents_stats,
        dropped_tokens=dropped_tokens,
    )
    log.info("domain %s: %s", name, stats)
    return _Built(store=store, plan=plan, stats=stats)


# ---- a preparation as arguments ----


def build_parser(prog: str = "python -m prolong_lit prepare") -> ArgumentParser:
    """The arguments that describe a preparation: PrepareConfig's fields (usually a YAML data spec given with
    `--config`, flags overriding it; `--print_config` shows the result) and `--overwrite`. The `prepare` command
    and a pipeline phase's `prepare:` list both take them, so the grammar lives here, below both."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    # omegaconf mode: a data spec may refer to its own settings, e.g. `path: ${paths.prolong_64k}/book-65536`
    parser = ArgumentParser(
        prog=prog,
        description="Tokenize, filter and pack raw documents into litdata shards (one directory per domain).",
        parser_mode="omegaconf",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the settings below")
    parser.add_class_arguments(PrepareConfig, as_group=False)
    parser.add_argument(
        "--overwrite", action=ActionYesNo, default=False, help="replace an existing prepared output_dir"
    )
    return parser


def parse_config(argv: list[str]) -> tuple[PrepareConfig, bool]:
    """The config and the overwrite flag from `prepare` arguments."""
    parser = build_parser()
    namespace = parser.instantiate(parser.parse_args(argv))
    names = [f.name for f in fields(PrepareConfig)]
    return PrepareConfig(**{name: namespace[name] for name in names}), bool(namespace.overwrite)
