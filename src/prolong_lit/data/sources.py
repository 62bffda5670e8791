"""Raw document sources for `prepare`: each yields the documents of one configured source as text.

File sources (`path` required): `jsonl` (plain or `.gz`), `parquet`, `text` (one file = one document) and
`repos` (each sub-directory of `path` is one code repository, read as ONE document: all its files
concatenated, each after a path header, in sorted path order; no dependency order, as ProLong did to keep
dependent files apart). Built-in sources (no `path`), from files every Python installation has:
`python_stdlib_packages` (each top-level package of the standard library as a repository of *.py files),
`pydoc_topics` (the help topics of `pydoc_data.topics`) and `python_docstrings` (module, class and function
docstrings of the standard library, read with `ast`; no module is imported).

Chat sources yield `Conversation`s instead of text. `chat` (jsonl, jsonl.gz or parquet files, UltraChat style):
each record's `messages` list of {role, content}, roles system/user/assistant, checked as it is read so a bad
record is named by file and line (jsonl) or row (parquet). `python_docstring_chats` (built in, the demo's SFT
data): one short synthetic exchange per public function, class and method of the standard library, the user
asking what `module.name` does and the assistant answering with the first paragraph of its docstring. A chat
source trains on the assistant replies, or with `loss_on: all` on every token (no loss mask).
"""

from __future__ import annotations

import ast
import codecs
import gzip
import json
import logging
import sysconfig
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prolong_lit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Written before every file of a repository document: `--- asyncio/base_events.py ---`.
REPO_FILE_HEADER = "--- {path} ---\n"
FILE_SOURCE_TYPES = ("jsonl", "parquet", "text", "repos", "chat")
BUILTIN_SOURCE_TYPES = ("python_stdlib_packages", "pydoc_topics", "python_docstrings", "python_docstring_chats")
SOURCE_TYPES = FILE_SOURCE_TYPES + BUILTIN_SOURCE_TYPES
CHAT_SOURCE_TYPES = ("chat", "python_docstring_chats")  # the sources that yield Conversations
# the sources of plain text, which trains on every token (loss_on is for sources that hold a loss mask)
TEXT_SOURCE_TYPES = ("jsonl", "parquet", "text", "repos", "python_stdlib_packages", "pydoc_topics", "python_docstrings")
# Which files of a directory `path` a file source reads when `pattern` is not set (searched recursively).
DEFAULT_PATTERNS = {"jsonl": "*.jsonl*", "parquet": "*.parquet", "text": "*.txt", "repos": "*"}
# The files a chat source reads under a directory when `pattern` is not set; `.parquet` is read as parquet,
# anything else as jsonl (plain or gzip).
CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all")  # a chat source's tokens that train (SourceConfig.loss_on)
DECODE_ERRORS = ("strict", "replace")  # SourceConfig.errors
DECODED_TYPES = ("jsonl", "text", "chat")  # the sources whose files this module decodes (errors applies)


@dataclass
class Conversation:
    """One chat record: its messages ({"role", "content"} dicts, roles in CHAT_ROLES), where it was read
    (`<file> line <n>` or `<file> row <n>`), so later errors (the chat template) can name the record, and which
    tokens train (`loss_on`, its source's setting: see SourceConfig)."""

    messages: list[dict[str, str]]
    where: str
    loss_on: str = "assistant"

    @property
    def num_chars(self) -> int:
        return sum(len(message["content"]) for message in self.messages)


@dataclass
class SourceConfig:
    """One source of raw documents.

    Args:
        type: jsonl | parquet | text | repos | chat | python_stdlib_packages | pydoc_topics | python_docstrings |
            python_docstring_chats.
        path: a file or a directory (file sources); must be left unset for the built-in sources.
        text_field: the field (jsonl) or column (parquet) holding the document text.
        messages_field: the field (jsonl) or column (parquet) holding a chat record's list of {role, content}
            messages (chat sources).
        pattern: glob of the files read under a directory `path` (searched recursively; default per type:
            *.jsonl* (plain or gzip), *.parquet, *.txt, every file of a repository, and for chat the files
            ending in .jsonl, .jsonl.gz or .parquet).
        exclude: names to skip: repository directories (repos, python_stdlib_packages) or top-level standard
            library modules/packages (python_docstrings, python_docstring_chats).
        loss_on: which tokens of a chat source's conversations train: `assistant` (the replies and their
            closing token; the prompts are masked, as in SFT) or `all` (every token, like a text document: no
            loss mask; ProLong's stage scripts train on Tulu-v2 this way). Text sources (jsonl, parquet, text,
            repos and the built-in text sources) train on every token and accept only the default.
        errors: what a byte that is not UTF-8 does in a jsonl, text or chat (jsonl) file: `strict` (an error
            naming the file and line) or `replace` (read as U+FFFD; the manifest's domain `documents` then
            count `with_replaced_bytes` and `replaced_bytes`).
    """

    type: str
    path: str | None = None
    text_field: str = "text"
    messages_field: str = "messages"
    pattern: str | None = None
    exclude: list[str] = field(default_factory=list)
    loss_on: str = "assistant"
    errors: str = "strict"


def validate_source(source: SourceConfig, setting: str) -> None:
    """Raise a clear error naming `setting` (e.g. `domains.books.sources[0]`) if the source is unusable.

    Reads the first document, so an empty source (no documents) is found before any work starts; jsonl, text
    and chat (jsonl) files are read through, so a malformed line or a byte that is not UTF-8 is named before
    any tokenizing (reading is far cheaper than tokenizing).
    """
    if source.type not in SOURCE_TYPES:
        raise ConfigError(f"{setting}.type: unknown source type {source.type!r} "
                          f"(choose from {', '.join(SOURCE_TYPES)})")
    if source.type in FILE_SOURCE_TYPES:
        if not source.path:
            raise ConfigError(f"{setting}.path: a {source.type} source needs a path")
        path = Path(source.path)
        if not path.exists():
            raise ConfigError(f"{setting}.path: {source.path!r} does not exist")
        if source.type == "repos" and not path.is_dir():
            raise ConfigError(f"{setting}.path: {source.path!r} must be a directory of repositories")
    elif source.path is not None:
        raise ConfigError(f"{setting}.path: the built-in source {source.type} reads no path (got {source.path!r})")
    if source.loss_on not in LOSS_ON:
        raise ConfigError(f"{setting}.loss_on: {source.loss_on!r} is not one of {', '.join(LOSS_ON)}")
    if source.loss_on != "assistant" and source.type in TEXT_SOURCE_TYPES:
        raise ConfigError(
            f"{setting}.loss_on: only chat sources have prompt tokens to mask (a {source.type} source trains on all)"
        )
    if source.errors not in DECODE_ERRORS:
        raise ConfigError(f"{setting}.errors: {source.errors!r} is not one of {', '.join(DECODE_ERRORS)}")
    if source.errors != "strict" and source.type not in DECODED_TYPES:
        raise ConfigError(f"{setting}.errors: only {', '.join(DECODED_TYPES)} sources read it (got {source.type})")
    documents = iter_documents(source, setting)
    if next(documents, None) is None:
        where = f" at {source.path!r}" if source.path else ""
        raise ConfigError(f"{setting}: the {source.type} source{where} holds no documents")
    if source.type in DECODED_TYPES:
        for _ in documents:  # every line parsed and decoded (and every chat record checked)
            pass


def iter_documents(source: SourceConfig, setting: str = "source",
                   counts: Counter | None = None) -> Iterator[str | Conversation]:
    """The documents of one source, in a deterministic order: texts, or `Conversation`s for a chat source.
    `counts` (if given) gets `with_replaced_bytes` and `replaced_bytes` of a source with errors: replace."""
    counts = Counter() if counts is None else counts
    if source.type in DECODED_TYPES:
        return _DECODED_READERS[source.type](source, setting, counts)
    return _READERS[source.type](source, setting)


def _decode(raw: bytes, source: SourceConfig, where: str, setting: str, counts: Counter) -> str:
    """`raw` as UTF-8: strict (a DataError naming `where` and the byte) or, with errors: replace, undecodable
    bytes as U+FFFD, counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if source.errors != "replace":
            line = raw.count(b"\n", 0, err.start)
            at = f" (its line {line + 1})" if line else ""
            raise DataError(f"{setting}: {where} is not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start}"
                            f"{at} does not decode; fix the file, or set {setting}.errors: replace to read such "
                            "bytes as U+FFFD (counted in the manifest)") from None
    _REPLACED[0] = 0
    text = raw.decode("utf-8", errors=_COUNT_REPLACE)
    counts.update(with_replaced_bytes=1, replaced_bytes=_REPLACED[0])
    return text


_REPLACED = [0]  # bytes replaced by the decode call running now (the handler below has no other way out)


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _REPLACED[0] += err.end - err.start
    return "\ufffd", err.end  # as errors="replace" does


_COUNT_REPLACE = "prolong_lit.count_and_replace"
codecs.register_error(_COUNT_REPLACE, _count_and_replace)


def _jsonl_records(path: Path, source: SourceConfig, setting: str, counts: Counter) -> Iterator[tuple[str, object]]:
    """(where, parsed record) of every non-blank line of a jsonl (or .jsonl.gz) file; a DataError naming the
    file and line for one that does not decode or parse."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path} line {line_no}"
            line = _decode(raw, source, where, setting, counts)
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{setting}: {where} is not valid JSON (column {err.colno}: {err.msg})") from None


def repository_document(repo_dir: Path, pattern: str = "*") -> str:
    """All files of a repository matching `pattern`, each after its path header, in sorted path order.

    Hidden files and directories (.git) and files that are not UTF-8 text (binaries) are skipped. Returns ""
    for a repository without any such file.
    """
    parts = []
    for path in _files(repo_dir, pattern):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            log.debug("skipping %s: not UTF-8 text", path)
            continue
        if "\0" in text:  # decodes as UTF-8 but is binary
            continue
        if text and not text.endswith("\n"):
            text += "\n"
        parts.append(REPO_FILE_HEADER.format(path=path.relative_to(repo_dir.parent).as_posix()) + text)
    return "".join(parts)


def stdlib_dir() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _files(path: Path, pattern: str) -> list[Path]:
    """`path` itself if it is a file, else the non-hidden files under it matching `pattern`, sorted."""
    if path.is_file():
        return [path]
    found = [p for p in path.rglob(pattern) if p.is_file()]
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _pattern(source: SourceConfig) -> str:
    return source.pattern or DEFAULT_PATTERNS[source.type]


def _text_of(record: dict, source: SourceConfig, where: str, setting: str) -> str:
    text = record.get(source.text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{setting}.text_field: {where} has no text field {source.text_field!r}")
    return text


def _read_jsonl(source: SourceConfig, setting: str, counts: Counter) -> Iterator[str]:
    for path in _files(Path(source.path), _pattern(source)):
        for where, record in _jsonl_records(path, source, setting, counts):
            yield _text_of(record, source, where, setting)


def _read_parquet(source: SourceConfig, setting: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in _files(Path(source.path), _pattern(source)):
        parquet = pq.ParquetFile(path)
        if source.text_field not in parquet.schema_arrow.names:
            raise DataError(f"{setting}.text_field: {path} has no column {source.text_field!r}")
        for batch in parquet.iter_batches(columns=[source.text_field], batch_size=1024):
            yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _read_text(source: SourceConfig, setting: str, counts: Counter) -> Iterator[str]:
    for path in _files(Path(source.path), _pattern(source)):
        yield _decode(path.read_bytes(), source, str(path), setting, counts)


def _repositories(root: Path, exclude: list[str], only_packages: bool = False) -> list[Path]:
    repos = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name.startswith(".") or path.name in exclude:
            continue
        if only_packages and not (path / "__init__.py").is_file():
            continue
        repos.append(path)
    return repos


def _read_repos(source: SourceConfig, setting: str) -> Iterator[str]:
    for repo in _repositories(Path(source.path), source.exclude):
        document = repository_document(repo, _pattern(source))
        if document:
            yield document


def _chat_files(source: SourceConfig) -> list[Path]:
    if source.pattern is not None:
        return _files(Path(source.path), source.pattern)
    path = Path(source.path)
    return [p for p in _files(path, "*") if p == path or p.name.endswith(CHAT_SUFFIXES)]


def _read_chat(source: SourceConfig, setting: str, counts: Counter) -> Iterator[Conversation]:
    for path in _chat_files(source):
        reader = _read_chat_parquet if path.name.endswith(".parquet") else _read_chat_jsonl
        for conversation in reader(path, source, setting, counts):
            conversation.loss_on = source.loss_on
            yield conversation


def _read_chat_parquet(path: Path, source: SourceConfig, setting: str, counts: Counter) -> Iterator[Conversation]:
    import pyarrow.parquet as pq

    field_name = source.messages_field
    parquet = pq.ParquetFile(path)
    if field_name not in parquet.schema_arrow.names:
        raise DataError(f"{setting}.messages_field: {path} has no column {field_name!r}")
    row = 0
    for batch in parquet.iter_batches(columns=[field_name], batch_size=1024):
        for messages in batch.column(0).to_pylist():
            row += 1
            yield _conversation(messages, f"{path} row {row}", field_name, setting)


def _read_chat_jsonl(path: Path, source: SourceConfig, setting: str, counts: Counter) -> Iterator[Conversation]:
    field_name = source.messages_field
    for where, record in _jsonl_records(path, source, setting, counts):
        if not isinstance(record, dict) or field_name not in record:
            raise DataError(f"{setting}.messages_field: {where} has no field {field_name!r}")
        yield _conversation(record[field_name], where, field_name, setting)


def _conversation(messages, where: str, field_name: str, setting: str) -> Conversation:
    """Check one record's messages; keep only role and content (what every chat template reads)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{setting}.messages_field: {where} field {field_name!r} is not a non-empty list of messages")
    checked = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise DataError(
                f"{setting}: {where} message {i} has unknown role {role!r} (allowed: {', '.join(CHAT_ROLES)})"
            )
        if not isinstance(message.get("content"), str):
            raise DataError(f"{setting}: {where} message {i} ({role}) has no text content")
        checked.append({"role": role, "content": message["content"]})
    return Conversation(messages=checked, where=where)


def _read_stdlib_packages(source: SourceConfig, setting: str) -> Iterator[str]:
    # site-packages holds installed third-party code, not the standard library.
    for package in _repositories(stdlib_dir(), ["site-packages", *source.exclude], only_packages=True):
        document = repository_document(package, source.pattern or "*.py")
        if document:
            yield document


def _read_pydoc_topics(source: SourceConfig, setting: str) -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            yield topics[name]


def _stdlib_files(source: SourceConfig) -> Iterator[tuple[Path, Path]]:
    """(path, path relative to the standard library) of its *.py files (or `pattern`), `exclude` skipped."""
    root = stdlib_dir()
    skip = {"site-packages", *source.exclude}
    for path in _files(root, source.pattern or "*.py"):
        top = path.relative_to(root).parts[0]
        if top not in skip and top.removesuffix(".py") not in skip:
            yield path, path.relative_to(root)


def _read_docstrings(source: SourceConfig, setting: str) -> Iterator[str]:
    for path, _ in _stdlib_files(source):
        yield from python_docstrings(path.read_bytes())


# Questions of the synthetic chats, picked by a hash of the name (so the data is the same on every run).
CHAT_QUESTIONS = (
    "What does `{name}` do?",
    "In Python's standard library, what is `{name}` for?",
    "Explain `{name}` briefly.",
    "I came across `{name}` in some Python code. What does it do?",
)


def _read_docstring_chats(source: SourceConfig, setting: str) -> Iterator[Conversation]:
    for path, relative in _stdlib_files(source):
        parts = [part.removesuffix(".py") for part in relative.parts if part != "__init__.py"]
        if any(part.startswith("_") for part in parts):  # private modules (_pydecimal, ...)
            continue
        module = ".".join(parts)
        for name, answer in public_api_summaries(path.read_bytes()):
            question = CHAT_QUESTIONS[zlib.crc32(name.encode()) % len(CHAT_QUESTIONS)]
            messages = [{"role": "user", "content": question.format(name=f"{module}.{name}")},
                        {"role": "assistant", "content": answer}]
            yield Conversation(messages=messages, where=f"{path} {name}", loss_on=source.loss_on)


_DECODED_READERS: dict[str, Callable[[SourceConfig, str, Counter], Iterator[str | Conversation]]] = {
    "jsonl": _read_jsonl,
    "text": _read_text,
    "chat": _read_chat,
}
_READERS: dict[str, Callable[[SourceConfig, str], Iterator[str | Conversation]]] = {
    "parquet": _read_parquet,
    "repos": _read_repos,
    "python_stdlib_packages": _read_stdlib_packages,
    "pydoc_topics": _read_pydoc_topics,
    "python_docstrings": _read_docstrings,
    "python_docstring_chats": _read_docstring_chats,
}


def public_api_summaries(code: bytes | str) -> Iterator[tuple[str, str]]:
    """(qualified name, first paragraph of its docstring) of the public module-level functions and classes of
    Python source and of the public methods of those classes, in source order; undocumented ones are skipped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return
    kinds = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if not isinstance(node, kinds) or node.name.startswith("_"):
            continue
        yield from _summary(node.name, node)
        if isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, kinds[1:]) and not child.name.startswith("_"):
                    yield from _summary(f"{node.name}.{child.name}", child)


def _summary(name: str, node: ast.AST) -> Iterator[tuple[str, str]]:
    docstring = ast.get_docstring(node, clean=True)
    paragraph = docstring.strip().split("\n\n")[0].strip() if docstring else ""
    if len(paragraph.split()) >= 3:  # "Return self." says nothing worth learning
        yield name, paragraph


def python_docstrings(code: bytes | str) -> Iterator[str]:
    """Module, class and function docstrings of Python source (cleaned by `ast.get_docstring`), in `ast.walk`
    order. Source that does not parse (the test suite's deliberately broken files) yields nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old code
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and docstring.strip():
                yield docstring


__all__ = [
    "CHAT_ROLES",
    "CHAT_SOURCE_TYPES",
    "LOSS_ON",
    "SOURCE_TYPES",
    "REPO_FILE_HEADER",
    "Conversation",
    "SourceConfig",
    "iter_documents",
    "public_api_summaries",
    "python_docstrings",
    "repository_document",
    "stdlib_dir",
    "validate_source",
]
