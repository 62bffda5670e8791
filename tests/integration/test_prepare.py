"""`prepare` end to end with the real Llama-3 tokenizer on a tiny corpus written into tmp_path: jsonl, jsonl.gz,
parquet, text files and a tree of code repositories. The shards are read back with litdata and compared with
a reference built by tokenizing every source document on its own."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prolong_lit.commands.prepare import main
from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, Manifest
from prolong_lit.data.prepare import DomainConfig, PrepareConfig, parse_config, prepare, validate
from prolong_lit.data.sources import SourceConfig
from prolong_lit.errors import ConfigError

SEQ_LEN = 64
BOS, EOS = 128000, 128001
WORDS = "the a long river of code under quiet stars where seven small foxes read old maps and sing".split()
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.yaml"


def prose(rng, n_words):
    return " ".join(rng.choice(WORDS, size=n_words)).capitalize() + "."


def write_corpus(root: Path) -> dict[str, list[str]]:
    """The raw documents of each domain, in source order; writes them as files under root."""
    rng = np.random.default_rng(0)
    books = [prose(rng, n) for n in (300, 40, 170)]  # the 40-word book is shorter than SEQ_LEN tokens
    (root / "books").mkdir()
    for i, text in enumerate(books):
        (root / "books" / f"book{i}.txt").write_text(text)
    repos = {
        "repo_a": {"main.py": "import os\n" + "x = 1\n" * 40, "lib/util.py": "def f():\n    return 2\n"},
        "repo_b": {"tiny.py": "y = 2\n"},
    }  # repo_b is too short
    for repo, files in repos.items():
        for rel, text in files.items():
            (root / "repos" / repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "repos" / repo / rel).write_text(text)
    code = ["".join(f"--- {repo}/{rel} ---\n{files[rel]}" for rel in sorted(files)) for repo, files in repos.items()]
    web = [prose(rng, int(n)) for n in rng.integers(1, 40, size=45)]
    (root / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in web[:20]))
    with gzip.open(root / "web2.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in web[20:30]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": web[30:]}), root / "web3.parquet")
    return {"books": books, "code": code, "web": web}


def make_config(root: Path, output_dir: Path, **overrides) -> PrepareConfig:
    domains = {
        "books": DomainConfig(mode="slice", sources=[SourceConfig("text", str(root / "books"))]),
        "code": DomainConfig(mode="slice", min_length=SEQ_LEN, sources=[SourceConfig("repos", str(root / "repos"))]),
        "web": DomainConfig(
            mode="concat",
            min_length=8,
            sources=[
                SourceConfig("jsonl", str(root / "web.jsonl")),
                SourceConfig("jsonl", str(root / "web2.jsonl.gz")),
                SourceConfig("parquet", str(root / "web3.parquet")),
            ],
        ),
    }
    settings = dict(tokenizer="", output_dir=str(output_dir), domains=domains, seq_len=SEQ_LEN, num_workers=1)
    return PrepareConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, llama3_tokenizer_dir):
    root = tmp_path_factory.mktemp("corpus")
    documents = write_corpus(root)
    config = make_config(root, root / "out" / "prepared", tokenizer=str(llama3_tokenizer_dir))
    manifest = prepare(config)
    return root, documents, config, manifest


def reference_ids(tokenizer, text):
    """Independent reference: the tokenizer's own encoding (BOS first) plus <|end_of_text|>."""
    return tokenizer(text)["input_ids"] + [EOS]


def read_samples(data_dir):
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(data_dir))
    return [dataset[i] for i in range(len(dataset))]


def snapshot(directory: Path):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_manifest_and_slices_match_the_reference(corpus, llama3_tokenizer):
    root, documents, config, manifest = corpus
    assert manifest == Manifest.read(config.output_dir)
    assert (manifest.tokenizer, manifest.vocab_size, manifest.seq_len) == (config.tokenizer, 128256, SEQ_LEN)
    for domain in ("books", "code"):  # slice: kept documents in source order, each cut into SEQ_LEN slices
        refs = [reference_ids(llama3_tokenizer, text) for text in documents[domain]]
        kept = [ids for ids in refs if len(ids) >= SEQ_LEN]
        expected = [ids[i : i + SEQ_LEN] for ids in kept for i in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN)]
        stats = manifest.domains[domain]
        assert len(kept) < len(refs)  # the fixture has one short document per long domain
        assert stats.documents == {"read": len(refs), "kept": len(kept), "dropped_min_length": len(refs) - len(kept)}
        assert stats.dropped_tokens == {"slice_remainder": sum(len(ids) % SEQ_LEN for ids in kept)}
        assert (stats.samples, stats.tokens) == (len(expected), len(expected) * SEQ_LEN)
        assert stats.max_token_id == max(max(ids) for ids in expected) and not stats.has_loss_mask
        samples = read_samples(Path(config.output_dir) / domain)
        assert len(samples) == len(expected)
        for sample, ids in zip(samples, expected):
            assert sample[INPUT_IDS].dtype == np.int32 and sample[INPUT_IDS].tolist() == ids
            assert sample[DOC_LENGTHS].tolist() == [SEQ_LEN]
    # the first document of the first sample, decoded, is the start of the source text
    first_book = read_samples(Path(config.output_dir) / "books")[0][INPUT_IDS]
    assert first_book[0] == BOS and documents["books"][0].startswith(llama3_tokenizer.decode(first_book[1:]))
    first_code = llama3_tokenizer.decode(read_samples(Path(config.output_dir) / "code")[0][INPUT_IDS][1:])
    assert first_code.startswith(
        "--- repo_a/lib/util.py ---\ndef f():\n    return 2\n--- repo_a/main.py ---\nimport os\n"
    )


def test_concat_packs_every_kept_document_once(corpus, llama3_tokenizer):
    root, documents, config, manifest = corpus
    refs = [reference_ids(llama3_tokenizer, text) for text in documents["web"]]
    kept = [ids for ids in refs if len(ids) >= 8]
    stats = manifest.domains["web"]
    assert stats.documents == {"read": 45, "kept": len(kept), "dropped_min_length": 45 - len(kept)} and len(kept) < 45
    samples = read_samples(Path(config.output_dir) / "web")
    assert stats.samples == len(samples) == sum(map(len, kept)) // SEQ_LEN
    stream = np.concatenate([s[INPUT_IDS] for s in samples])
    for sample in samples:  # every document piece inside a sample but the first starts a document (BOS)
        starts = np.cumsum(sample[DOC_LENGTHS])[:-1]
        assert sample[DOC_LENGTHS].sum() == SEQ_LEN and (sample[INPUT_IDS][starts] == BOS).all()
    assert any(s[INPUT_IDS][0] != BOS for s in samples)  # some sample opens with the cut tail of a document
    # split the written stream at BOS: whole reference documents, then one partial one cut by the dropped end
    bounds = np.flatnonzero(stream == BOS).tolist() + [len(stream)]
    pieces = [stream[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
    remaining = Counter(map(tuple, kept))
    for piece in pieces[:-1]:
        assert remaining[tuple(piece)] > 0
        remaining[tuple(piece)] -= 1
    last = pieces[-1]
    assert any(doc[: len(last)] == tuple(last) for doc in remaining.elements())
    assert stats.dropped_tokens == {"final_partial_sample": sum(map(len, remaining.elements())) - len(last)}
    in_source_order = [tuple(ids) for ids in kept][: len(pieces) - 1]
    assert [tuple(p) for p in pieces[:-1]] != in_source_order  # the documents were shuffled


def test_slice_pack_keeps_whole_slices_within_the_length_limits(corpus, tmp_path, llama3_tokenizer):
    """mode slice_pack: the books between slice_length and max_length tokens, cut into 16-token slices, four per
    64-token row, each slice its own document; the longest book is over max_length and left out."""
    root, documents, config, _ = corpus
    refs = [reference_ids(llama3_tokenizer, text) for text in documents["books"]]
    slice_length, max_length = 16, max(map(len, refs)) - 1
    books = DomainConfig(
        mode="slice_pack", slice_length=slice_length, max_length=max_length,
        sources=[SourceConfig("text", str(root / "books"))],
    )
    spec = make_config(root, tmp_path / "packed", tokenizer=config.tokenizer, domains={"books": books})
    stats = prepare(spec).domains["books"]
    kept = [ids for ids in refs if slice_length <= len(ids) <= max_length]
    assert len(kept) == 2 and stats.documents == {"read": 3, "kept": 2, "dropped_min_length": 0, "dropped_too_long": 1}
    cuts = [(ids, start) for ids in kept for start in range(0, len(ids) - slice_length + 1, slice_length)]
    slices = Counter(tuple(ids[start : start + slice_length]) for ids, start in cuts)
    per_row = SEQ_LEN // slice_length
    samples = read_samples(tmp_path / "packed" / "books")
    assert stats.samples == len(samples) == sum(slices.values()) // per_row >= 2
    written = Counter()
    for sample in samples:
        assert sample[DOC_LENGTHS].tolist() == [slice_length] * per_row  # a boundary at every slice
        ids = sample[INPUT_IDS].tolist()
        written.update(tuple(ids[k : k + slice_length]) for k in range(0, SEQ_LEN, slice_length))
    assert not written - slices  # only whole slices of kept books, each at most as often as it occurs
    # nothing lost but what the manifest declares: the remainders and the slices of a final partial row
    assert stats.dropped_tokens == {
        "slice_remainder": sum(len(ids) % slice_length for ids in kept),
        "final_partial_sample": sum(slices.values()) % per_row * slice_length,
    }
    assert sum(written.values()) * slice_length + sum(stats.dropped_tokens.values()) == sum(map(len, kept))


def test_reruns_are_byte_identical_with_any_worker_count(corpus, tmp_path):
    root, documents, config, manifest = corpus
    again = make_config(root, tmp_path / "again", tokenizer=config.tokenizer, num_workers=2)
    assert prepare(again) == manifest
    first, second = snapshot(Path(config.output_dir)), snapshot(tmp_path / "again")
    assert sorted(first) == sorted(second) and len(first) == 7  # manifest + 3 x (index.json + one chunk)
    for name in first:
        assert first[name] == second[name], name


def test_index_timestamp_is_the_digest_of_the_chunks_in_order(corpus, tmp_path):
    """updated_at is the sha256 of the chunk files concatenated in index order, however many chunks there are
    (write_domain hashes them while litdata still writes the later ones)."""
    root, documents, config, manifest = corpus
    out = tmp_path / "small_chunks"
    prepare(make_config(root, out, tokenizer=config.tokenizer, chunk_bytes="1kb"))
    chunks = {}
    for name in manifest.domains:
        index = json.loads((out / name / "index.json").read_text())
        chunks[name] = len(index["chunks"])
        digest = hashlib.sha256(b"".join((out / name / c["filename"]).read_bytes() for c in index["chunks"]))
        assert index["updated_at"] == digest.hexdigest()[:32], name
    assert max(chunks.values()) > 2, chunks


def test_existing_output_is_refused_unless_overwrite(corpus, tmp_path):
    root, documents, config, manifest = corpus
    out = tmp_path / "prepared"
    prepare(make_config(root, out, tokenizer=config.tokenizer))
    before = snapshot(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match=r"^output_dir: .* already exists; pass --overwrite"):
        prepare(make_config(root, out, tokenizer=config.tokenizer, seq_len=32))
    assert snapshot(out) == before and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no scratch left behind
    smaller = prepare(make_config(root, out, tokenizer=config.tokenizer, seq_len=32), overwrite=True)
    assert Manifest.read(out) == smaller and smaller.seq_len == 32
    # a directory that is not prepared data is never deleted, even with overwrite
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"^output_dir: .* is not a prepared data directory"):
        prepare(make_config(root, tmp_path / "precious", tokenizer=config.tokenizer), overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def _bad(config: PrepareConfig, case: str, root: Path) -> None:
    if case == "missing_path":
        config.domains["books"].sources[0].path = str(root / "no_such_dir")
    elif case == "empty_source":
        (root / "empty.jsonl").write_text("")
        config.domains["web"].sources[1] = SourceConfig("jsonl", str(root / "empty.jsonl"))
    elif case == "unknown_type":
        config.domains["web"].sources[2].type = "csv"
    elif case == "seq_len":
        config.seq_len = 0
    elif case == "tokenizer":
        config.tokenizer = str(root / "no_tokenizer_here")
    elif case == "min_length":
        config.domains["code"].min_length = SEQ_LEN - 1
    elif case == "mode":
        config.domains["web"].mode = "pack"
    elif case == "domain_name":
        config.domains["../escape"] = config.domains.pop("web")
    elif case == "eos_token":
        config.eos_token = "<|no_such_token|>"
    elif case == "chunk_bytes":
        config.chunk_bytes = "lots"
    elif case == "slice_length":
        config.domains["code"].mode, config.domains["code"].slice_length = "slice_pack", 24
    elif case == "no_slice_length":
        config.domains["code"].mode = "slice_pack"
    elif case == "stray_slice_length":
        config.domains["web"].slice_length = 16
    elif case == "max_length":
        config.domains["code"].max_length = SEQ_LEN - 1
    elif case == "loss_on":
        config.domains["web"].sources[0].loss_on = "all"


@pytest.mark.parametrize(
    "case, error",
    [
        ("missing_path", r"^domains\.books\.sources\[0\]\.path: '.*no_such_dir' does not exist"),
        ("empty_source", r"^domains\.web\.sources\[1\]: the jsonl source at '.*empty\.jsonl' holds no documents"),
        ("unknown_type", r"^domains\.web\.sources\[2\]\.type: unknown source type 'csv'"),
        ("seq_len", r"^seq_len: must be a positive number of tokens \(got 0\)"),
        ("tokenizer", r"^tokenizer: tokenizer directory '.*no_tokenizer_here' does not exist"),
        ("min_length", r"^domains\.code\.min_length \(63\) must be >= seq_len \(64\) in slice mode"),
        ("mode", r"^domains\.web\.mode: unknown mode 'pack'"),
        ("domain_name", r"^domains\.\.\./escape: a domain name must be a plain directory name"),
        ("eos_token", r"^eos_token: '<\|no_such_token\|>' is not a token"),
        ("chunk_bytes", r"^chunk_bytes: 'lots' is not a size"),
        ("slice_length", r"^domains\.code\.slice_length \(24\): seq_len \(64\) must be a multiple of it"),
        ("no_slice_length", r"^domains\.code\.slice_length: mode slice_pack needs a slice length"),
        ("stray_slice_length", r"^domains\.web\.slice_length: only mode slice_pack reads it \(mode is concat\)"),
        ("max_length", r"^domains\.code\.max_length \(63\) is below the minimum length \(64\)"),
        ("loss_on", r"^domains\.web\.sources\[0\]\.loss_on: only chat sources have prompt tokens to mask"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(corpus, tmp_path, case, error):
    root, documents, config, manifest = corpus
    (tmp_path / "corpus_extra").mkdir()
    bad = make_config(root, tmp_path / "out" / "prepared", tokenizer=config.tokenizer)
    _bad(bad, case, tmp_path / "corpus_extra")
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        prepare(bad)
    assert info.match(error)
    assert not (tmp_path / "out").exists()  # nothing written, not even the parent or a scratch directory


def test_command_line(corpus, tmp_path, capsys):
    root, documents, config, manifest = corpus
    yaml_path = tmp_path / "prepare.yaml"
    yaml_path.write_text(
        f"tokenizer: {config.tokenizer}\noutput_dir: {tmp_path / 'ignored'}\nseq_len: 32\nnum_workers: 1\n"
        "domains:\n"
        f"  web: {{mode: concat, sources: [{{type: jsonl, path: {root / 'web.jsonl'}}}]}}\n"
    )
    out = tmp_path / "from_cli"
    main(["--config", str(yaml_path), "--output_dir", str(out)])
    assert not (tmp_path / "ignored").exists()
    built = Manifest.read(out)
    assert built.seq_len == 32 and list(built.domains) == ["web"] and built.domains["web"].documents["read"] == 20
    with pytest.raises(ConfigError, match="^output_dir"):
        main(["--config", str(yaml_path), "--output_dir", str(out)])
    main(["--config", str(yaml_path), "--output_dir", str(out), "--overwrite", "--seed", "7"])
    assert Manifest.read(out) == built  # the seed reorders documents, not the counts


def test_demo_config_parses_and_validates(tmp_path):
    config, overwrite = parse_config(["--config", str(DEMO_CONFIG), "--output_dir", str(tmp_path / "demo")])
    assert not overwrite and (config.tokenizer, config.seq_len) == ("llama3", 2048)
    assert {name: (d.mode, [s.type for s in d.sources]) for name, d in config.domains.items()} == {
        "code_repos": ("slice", ["python_stdlib_packages"]),
        "prose": ("concat", ["pydoc_topics"]),
        "docstrings": ("concat", ["python_docstrings"]),
    }
    tokenizer, eos_id, vocab_size = validate(config)
    assert eos_id == EOS and len(tokenizer) == vocab_size == 128256
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_prepare_end_to_end(tmp_path, llama3_tokenizer):
    config, _ = parse_config(["--config", str(DEMO_CONFIG), "--output_dir", str(tmp_path / "demo")])
    manifest = prepare(config)
    for name, stats in manifest.domains.items():
        samples = read_samples(tmp_path / "demo" / name)
        assert len(samples) == stats.samples >= 40
        assert all(s[DOC_LENGTHS].sum() == 2048 and s[INPUT_IDS].max() < 128256 for s in samples[:50])
    assert manifest.domains["code_repos"].samples >= 500
    first = llama3_tokenizer.decode(read_samples(tmp_path / "demo" / "code_repos")[0][INPUT_IDS][1:200])
    assert first.startswith("--- asyncio/__init__.py ---\n")
