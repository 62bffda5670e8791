"""Raw document sources: every file format, repositories read as one document, the built-in sources, and the
errors for unusable sources. Fixtures are tiny files written into tmp_path."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from prolong_lit.data.sources import (
    REPO_FILE_HEADER,
    SourceConfig,
    iter_documents,
    python_docstrings,
    stdlib_dir,
    validate_source,
)
from prolong_lit.errors import ConfigError, DataError


def write_jsonl(path, texts, field="text", compress=False):
    lines = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def test_jsonl_plain_gzip_and_directory(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", ["first doc", "second doc ü"])
    zipped = write_jsonl(tmp_path / "b.jsonl.gz", ["third doc"], compress=True)
    (tmp_path / "notes.txt").write_text("not read: does not match *.jsonl*")
    assert list(iter_documents(SourceConfig("jsonl", str(plain)))) == ["first doc", "second doc ü"]
    assert list(iter_documents(SourceConfig("jsonl", str(zipped)))) == ["third doc"]
    # a directory: every matching file, in sorted path order
    assert list(iter_documents(SourceConfig("jsonl", str(tmp_path)))) == ["first doc", "second doc ü", "third doc"]


def test_jsonl_text_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["x", "y"], field="content")
    assert list(iter_documents(SourceConfig("jsonl", str(path), text_field="content"))) == ["x", "y"]
    with pytest.raises(ValueError, match=r"src\.text_field: .*a\.jsonl line 1 has no text field 'text'"):
        list(iter_documents(SourceConfig("jsonl", str(path)), "src"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"parquet document {i}" for i in range(2500)]  # several read batches
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), tmp_path / "a.parquet", row_group_size=700)
    assert list(iter_documents(SourceConfig("parquet", str(tmp_path / "a.parquet")))) == texts
    with pytest.raises(ValueError, match=r"s\.text_field: .* has no column 'body'"):
        list(iter_documents(SourceConfig("parquet", str(tmp_path), text_field="body"), "s"))


def test_text_files_one_document_each(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / ".hidden.txt").write_text("skipped")
    (tmp_path / "d.md").write_text("not *.txt")
    assert list(iter_documents(SourceConfig("text", str(tmp_path)))) == ["ay", "bee", "sea\n"]
    assert list(iter_documents(SourceConfig("text", str(tmp_path), pattern="*.md"))) == ["not *.txt"]


def make_repos(root):
    """Two repositories (and one without files); returns {repo: {relative path: text}}."""
    files = {
        "alpha": {"setup.py": "print('setup')", "src/b.py": "B = 2\n", "src/a.py": "A = 1\n", "README": "alpha\n"},
        "beta": {"main.c": "int main() { return 0; }\n"},
    }
    for repo, contents in files.items():
        for rel, text in contents.items():
            (root / repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / repo / rel).write_text(text)
    (root / "alpha" / ".git").mkdir()
    (root / "alpha" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: skipped
    (root / "alpha" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")  # binary: skipped
    (root / "empty_repo").mkdir()
    return files


def test_repos_one_document_per_repository(tmp_path):
    files = make_repos(tmp_path)
    documents = list(iter_documents(SourceConfig("repos", str(tmp_path))))
    assert len(documents) == 2  # the empty repository gives no document
    for document, (repo, contents) in zip(documents, sorted(files.items())):
        # independent reference: every file, sorted by path, after its header, newline-terminated
        expected = "".join(
            f"--- {repo}/{rel} ---\n" + (text if text.endswith("\n") else text + "\n")
            for rel, text in sorted(contents.items())
        )
        assert document == expected
    assert documents[0].index("--- alpha/README ---") < documents[0].index("--- alpha/setup.py ---")
    assert documents[0].index("--- alpha/setup.py ---") < documents[0].index("--- alpha/src/a.py ---")
    assert REPO_FILE_HEADER.format(path="beta/main.c") in documents[1]


def test_repos_pattern_and_exclude(tmp_path):
    make_repos(tmp_path)
    [only_py] = iter_documents(SourceConfig("repos", str(tmp_path), pattern="*.py", exclude=["beta"]))
    assert (
        only_py
        == "--- alpha/setup.py ---\nprint('setup')\n--- alpha/src/a.py ---\nA = 1\n--- alpha/src/b.py ---\nB = 2\n"
    )


def test_python_docstrings_from_source():
    code = '''"""Module doc."""

def f():
    """Function doc.

        Indented detail.
    """

class C:
    """Class doc."""

    async def m(self):
        """Method doc."""

def undocumented():
    pass
'''
    assert list(python_docstrings(code)) == [
        "Module doc.",
        "Function doc.\n\nIndented detail.",
        "Class doc.",
        "Method doc.",
    ]
    assert list(python_docstrings("def broken(:\n")) == []  # unparsable source yields nothing


def test_builtin_sources():
    from pydoc_data.topics import topics

    prose = list(iter_documents(SourceConfig("pydoc_topics")))
    assert prose == [topics[name] for name in sorted(topics) if topics[name].strip()]
    assert len(prose) > 50

    packages = list(iter_documents(SourceConfig("python_stdlib_packages", exclude=["test", "idlelib"])))
    names = sorted(p.name for p in stdlib_dir().iterdir() if (p / "__init__.py").is_file())
    assert len(packages) == len(set(names) - {"test", "idlelib"})
    [json_doc] = [d for d in packages if d.startswith("--- json/__init__.py ---\n")]
    decoder = (stdlib_dir() / "json" / "decoder.py").read_text()
    assert "--- json/decoder.py ---\n" + decoder in json_doc

    docstrings = iter_documents(SourceConfig("python_docstrings", exclude=["test"]))
    first = [next(docstrings) for _ in range(20)]
    assert all(isinstance(d, str) and d.strip() for d in first)


@pytest.mark.parametrize(
    "source, error, message",
    [
        (SourceConfig("csv", "x.csv"), ValueError, r"^s\[0\]\.type: unknown source type 'csv'"),
        (SourceConfig("jsonl"), ValueError, r"^s\[0\]\.path: a jsonl source needs a path"),
        (
            SourceConfig("parquet", "{tmp}/missing.parquet"),
            ConfigError,
            r"^s\[0\]\.path: .*missing\.parquet' does not exist",
        ),
        (SourceConfig("repos", "{tmp}/empty.jsonl"), ConfigError, r"^s\[0\]\.path: .* must be a directory"),
        (
            SourceConfig("pydoc_topics", "{tmp}"),
            ValueError,
            r"^s\[0\]\.path: the built-in source pydoc_topics reads no path",
        ),
        (SourceConfig("jsonl", "{tmp}/empty.jsonl"), ValueError, r"^s\[0\]: the jsonl source at .* holds no documents"),
        (SourceConfig("text", "{tmp}/nothing_here"), ValueError, r"^s\[0\]: the text source .* holds no documents"),
        (SourceConfig("repos", "{tmp}/empty_repos"), ValueError, r"^s\[0\]: the repos source .* holds no documents"),
    ],
)
def test_validate_source_errors(tmp_path, source, error, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "nothing_here").mkdir()
    (tmp_path / "nothing_here" / "a.md").write_text("no .txt file")
    (tmp_path / "empty_repos" / "r1" / ".git").mkdir(parents=True)
    if source.path:
        source.path = source.path.format(tmp=tmp_path)
    with pytest.raises(error, match=message):
        validate_source(source, "s[0]")


def test_validate_source_accepts_good_sources(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["doc"])
    validate_source(SourceConfig("jsonl", str(tmp_path / "a.jsonl")), "s")
    validate_source(SourceConfig("pydoc_topics"), "s")


def test_bad_lines_are_named_by_file_line_and_byte(tmp_path):
    """A jsonl line that is not JSON, or not UTF-8, is a DataError naming the file and line (the byte and its
    offset for UTF-8), found by validate_source's read-through, before any tokenizing."""
    good = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5))
    cases = {
        "cut.jsonl": (good + '{"text": "cut\n').encode(),
        "latin1.jsonl": good.encode() + '{"text": "café"}\n'.encode("latin-1"),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    gz = tmp_path / "cut.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(cases["cut.jsonl"])
    with pytest.raises(DataError, match=r"^s: .*cut\.jsonl line 6 is not valid JSON \(column 14: "):
        validate_source(SourceConfig("jsonl", str(tmp_path / "cut.jsonl")), "s")
    with pytest.raises(DataError, match=r"^s: .*cut\.jsonl\.gz line 6 is not valid JSON"):
        validate_source(SourceConfig("jsonl", str(gz)), "s")
    with pytest.raises(DataError, match=r"^s: .*latin1\.jsonl line 6 is not UTF-8: byte 0xe9 at offset 13 .*"
                                        r"set s\.errors: replace"):
        validate_source(SourceConfig("jsonl", str(tmp_path / "latin1.jsonl")), "s")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n{oops}\n")
    with pytest.raises(DataError, match=r"^s: .*chat\.jsonl line 2 is not valid JSON"):
        validate_source(SourceConfig("chat", str(chat)), "s")


def test_errors_replace_reads_undecodable_bytes_as_replacement_characters_and_counts_them(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 and \xff\xfe\n")
    (tmp_path / "b.txt").write_bytes(b"clean\n")
    with pytest.raises(DataError, match=r"^s: .*a\.txt is not UTF-8: byte 0xe9 at offset 3 does not decode"):
        validate_source(SourceConfig("text", str(tmp_path)), "s")
    counts = Counter()
    texts = list(iter_documents(SourceConfig("text", str(tmp_path), errors="replace"), "s", counts))
    assert texts == ["caf\ufffd and \ufffd\ufffd\n", "clean\n"]  # what errors="replace" gives
    assert texts[0] == (tmp_path / "a.txt").read_bytes().decode("utf-8", errors="replace")
    assert counts == {"with_replaced_bytes": 1, "replaced_bytes": 3}
    with pytest.raises(ConfigError, match=r"^s\.errors: 'ignore' is not one of strict, replace"):
        validate_source(SourceConfig("text", str(tmp_path), errors="ignore"), "s")
    with pytest.raises(ConfigError, match=r"^s\.errors: only jsonl, text, chat sources read it \(got parquet\)"):
        validate_source(SourceConfig("parquet", str(tmp_path / "a.txt"), errors="replace"), "s")
