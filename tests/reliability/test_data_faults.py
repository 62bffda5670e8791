"""Faulty data through the real command line: damaged prepared data under `fit`, bad source files under `prepare`.

Each case runs `python -m prolong_lit fit|prepare ...` in its own process with a wall-clock limit (a hang fails the
test; tests/helpers/fault_helpers.py) and asserts exit status 2, one `error:` line naming the file (and line, or
setting), and that the folders involved are unchanged by the refused command.

- `fit` on prepared data with a truncated, missing, over-long or header-damaged chunk file, or a broken index.json
  (the DataModule checks every chunk against index.json before litdata opens one: data/verify.py; litdata itself
  waits for a short chunk "to finish downloading"); the same on data written by litdata's own `optimize` (a
  dataset prepared before sizes were checked); on the partial output of a killed `prepare`. A micro-batch larger
  than a domain's rows is a warning naming the domain and the numbers.
- `prepare` on a malformed jsonl line, a jsonl or text file that is not UTF-8 (named by file, line and byte
  before any tokenizing), and with `errors: replace` the replaced bytes counted in the manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from prolong_lit.data.prepare import DomainConfig, PrepareConfig, prepare
from prolong_lit.data.sources import SourceConfig
from prolong_lit.data.verify import INCOMPLETE_MARKER, verify_domain
from prolong_lit.errors import DataError
from tests.helpers.data_factory import write_prepared
from tests.helpers.fault_helpers import assert_refused, run_command, snapshot

pytestmark = pytest.mark.reliability
SEQ_LEN = 128
WORDS = "the a long river of code under quiet stars where seven small foxes read old maps and sing".split()
TIMEOUT = 120  # seconds: every case ends in a few; a hang fails here


# ---- shared with test_prepare_faults.py ----


def write_jsonl(path: Path, documents: int, seed: int = 0, words: int = 200) -> Path:
    """`documents` prose documents of 20 to `words` words as `{"text": ...}` lines."""
    rng = np.random.default_rng(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=int(n)))}) for n in rng.integers(20, words, documents)]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_config(path: Path, tokenizer: Path, output_dir: Path, sources: dict[str, list[dict]],
                   chunk_bytes: str = "4KB", seq_len: int = SEQ_LEN, num_workers: int = 1) -> Path:
    """A data spec YAML at `path`: one concat domain per entry of `sources` (its list of source settings)."""
    spec = {"tokenizer": str(tokenizer), "output_dir": str(output_dir), "seq_len": seq_len, "num_workers": num_workers,
            "chunk_bytes": chunk_bytes,
            "domains": {name: {"mode": "concat", "sources": listed} for name, listed in sources.items()}}
    path.write_text(yaml.safe_dump(spec))
    return path


def fit_config(path: Path, data_dir: Path, root: Path, weights: dict[str, float], micro_batch_size: int = 1,
               val_samples_per_domain: int = 2) -> Path:
    """The smallest `fit`: the tiny Llama on `data_dir`, one step, no validation, checkpoint or logger."""
    config = {
        "seed_everything": 42,
        "trainer": {"accelerator": "cpu", "devices": 1, "default_root_dir": str(root), "max_steps": 1,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
                    "logger": False, "enable_progress_bar": False},
        "model": {"class_path": "prolong_lit.model.module.LongContextLM",
                  "init_args": {"llama": {"name_or_path": "tiny"}}},
        "data": {"class_path": "prolong_lit.data.datamodule.MixtureDataModule",
                 "init_args": {"data_dir": str(data_dir), "seq_len": SEQ_LEN, "micro_batch_size": micro_batch_size,
                               "weights": weights, "val_samples_per_domain": val_samples_per_domain,
                               "num_workers": 0}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def chunks(domain_dir: Path) -> list[dict]:
    return json.loads((domain_dir / "index.json").read_text())["chunks"]


# ---- prepared data, damaged ----


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, llama3_tokenizer_dir) -> Path:
    """Data built by `prepare` (the real tokenizer): domains web and code, several 4 KB chunks each."""
    root = tmp_path_factory.mktemp("prepared")
    web, code = write_jsonl(root / "web.jsonl", 120, seed=0), write_jsonl(root / "code.jsonl", 120, seed=1)
    domains = {name: DomainConfig(sources=[SourceConfig("jsonl", str(path))], mode="concat")
               for name, path in (("web", web), ("code", code))}
    prepare(PrepareConfig(tokenizer=str(llama3_tokenizer_dir), output_dir=str(root / "data"), domains=domains,
                          seq_len=SEQ_LEN, num_workers=1, chunk_bytes="4KB"))
    return root / "data"


def damaged_copy(prepared: Path, tmp_path: Path, damage) -> Path:
    """A copy of the prepared data with `damage(data_dir)` done to it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    damage(data)
    return data


def _truncate_last(data: Path) -> None:
    last = data / "web" / chunks(data / "web")[-1]["filename"]
    os.truncate(last, last.stat().st_size - 100)


def _truncate_every(data: Path) -> None:
    for chunk in chunks(data / "code"):
        os.truncate(data / "code" / chunk["filename"], chunk["chunk_bytes"] // 2)


def _lengthen(data: Path) -> None:
    with open(data / "web" / chunks(data / "web")[0]["filename"], "ab") as f:
        f.write(b"\0" * 10)


def _remove(data: Path) -> None:
    (data / "code" / chunks(data / "code")[1]["filename"]).unlink()


def _count_field(data: Path) -> None:  # same size, the header's item count changed
    with open(data / "web" / chunks(data / "web")[2]["filename"], "r+b") as f:
        f.write(np.uint32(99).tobytes())


def _offsets(data: Path) -> None:  # same size and count, an offset past the file's end
    with open(data / "web" / chunks(data / "web")[0]["filename"], "r+b") as f:
        f.seek(8)
        f.write(np.uint32(1 << 30).tobytes())


def _index(data: Path) -> None:
    index = data / "code" / "index.json"
    index.write_text(index.read_text()[:200])


DAMAGE = {  # case -> (damage, what the message names besides the file)
    "truncated last chunk": (_truncate_last, ["web/chunk-0-", "truncated", "index.json records"]),
    "every chunk truncated": (_truncate_every, ["code/chunk-0-0.bin", "truncated"]),
    "chunk longer than recorded": (_lengthen, ["web/chunk-0-0.bin", "longer than recorded"]),
    "chunk missing": (_remove, ["code/chunk-0-1.bin", "missing"]),
    "header item count": (_count_field, ["web/chunk-0-2.bin", "holds 99 items"]),
    "header offsets": (_offsets, ["web/chunk-0-0.bin", "damaged header"]),
    "index.json cut": (_index, ["code/index.json", "not valid JSON"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_kind_of_damage_is_named(prepared, tmp_path, case):
    """The check itself (`verify_domain`, what the DataModule's setup runs on each domain), in process."""
    damage, names = DAMAGE[case]
    data = damaged_copy(prepared, tmp_path, damage)
    domain = "code" if "code/" in names[0] else "web"
    with pytest.raises(DataError) as refusal:
        verify_domain(data / domain)
    for name in names:
        assert name in str(refusal.value)
    assert verify_domain(prepared / domain) == sum(chunk["chunk_size"] for chunk in chunks(prepared / domain))


@pytest.mark.parametrize("case", ["truncated last chunk", "chunk missing", "index.json cut"])
def test_fit_refuses_damaged_prepared_data_naming_the_file(prepared, tmp_path, case):
    damage, names = DAMAGE[case]
    data = damaged_copy(prepared, tmp_path, damage)
    config = fit_config(tmp_path / "fit.yaml", data, tmp_path / "run", {"web": 0.5, "code": 0.5})
    before = snapshot(data)
    result = run_command(["fit", "--config", config], timeout=TIMEOUT)
    message = assert_refused(result, "data.data_dir", *names)
    assert "prepare" in message  # what to do
    assert snapshot(data) == before


def test_fit_checks_data_written_by_litdata_optimize(tmp_path):
    """Data from litdata's own writer (as every dataset prepared before chunk checks was) is checked the same
    way: its index.json records each chunk's size."""
    data = tmp_path / "data"
    write_prepared(data, {"web": 12, "code": 12}, seq_len=SEQ_LEN)
    _truncate_every(data)
    config = fit_config(tmp_path / "fit.yaml", data, tmp_path / "run", {"web": 0.5, "code": 0.5})
    before = snapshot(data)
    result = run_command(["fit", "--config", config], timeout=TIMEOUT)
    assert_refused(result, "code/chunk-0-0.bin", "truncated")
    assert snapshot(data) == before


def test_fit_refuses_the_partial_output_of_an_interrupted_prepare(prepared, tmp_path):
    """What a kill while `prepare` writes leaves: the incomplete marker (and here a manifest, written just
    before the marker goes). Not data, whatever else is there."""
    data = damaged_copy(prepared, tmp_path, lambda data: (data / INCOMPLETE_MARKER).touch())
    config = fit_config(tmp_path / "fit.yaml", data, tmp_path / "run", {"web": 0.5, "code": 0.5})
    before = snapshot(data)
    result = run_command(["fit", "--config", config], timeout=TIMEOUT)
    assert_refused(result, "data.data_dir", str(data), "incomplete", "--overwrite")
    assert snapshot(data) == before


def test_a_micro_batch_larger_than_a_domain_warns_once(tmp_path):
    """Domain `small` has 3 training rows, the micro-batch 4: one warning naming both numbers; the run goes
    on (exit 0)."""
    data = tmp_path / "data"
    write_prepared(data, {"small": 5, "big": 40}, seq_len=SEQ_LEN)
    config = fit_config(tmp_path / "fit.yaml", data, tmp_path / "run", {"small": 0.5, "big": 0.5},
                        micro_batch_size=4)
    result = run_command(["fit", "--config", config], timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "data.micro_batch_size (4)" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "'small'" in warnings[0] and "3 training rows" in warnings[0] and "'big'" not in warnings[0]


# ---- bad source files ----


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    write_jsonl(root / "web.jsonl", 400)
    return root


def _refused_prepare(tmp_path: Path, tokenizer: Path, sources: list[dict], *names: str) -> str:
    """`prepare` of one domain from `sources`: refused naming `names`, nothing written (no output, no scratch)."""
    out = tmp_path / "out" / "data"
    spec = prepare_config(tmp_path / "data.yaml", tokenizer, out, {"web": sources})
    before = snapshot(tmp_path)
    result = run_command(["prepare", "--config", spec], timeout=TIMEOUT)
    message = assert_refused(result, *names)
    assert snapshot(tmp_path) == before and not out.parent.exists()
    return message


def test_a_malformed_jsonl_line_is_named_before_any_tokenizing(corpus, tmp_path, llama3_tokenizer_dir):
    """Line 401 of a 401-line file is cut short: the refusal names file and line, from the check of every
    line that comes before the tokenizer runs (nothing written, no scratch folder)."""
    path = corpus / "web.jsonl"
    path.write_text(path.read_text() + '{"text": "cut sho\n')
    _refused_prepare(tmp_path, llama3_tokenizer_dir, [{"type": "jsonl", "path": str(path)}],
                     "domains.web.sources[0]", f"{path} line 401", "not valid JSON")


def test_a_jsonl_file_that_is_not_utf8_is_named_by_line_and_byte(corpus, tmp_path, llama3_tokenizer_dir):
    path = corpus / "web.jsonl"
    path.write_bytes(path.read_bytes() + '{"text": "café"}\n'.encode("latin-1"))
    message = _refused_prepare(tmp_path, llama3_tokenizer_dir, [{"type": "jsonl", "path": str(path)}],
                               f"{path} line 401", "not UTF-8", "0xe9", "domains.web.sources[0].errors: replace")
    assert "offset 13" in message


def test_a_text_file_that_is_not_utf8_is_refused_by_default(tmp_path, llama3_tokenizer_dir):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_bytes(b"first line\nsecond caf\xe9 line\n" * 40)
    _refused_prepare(tmp_path, llama3_tokenizer_dir, [{"type": "text", "path": str(books)}],
                     f"{books / 'a.txt'}", "not UTF-8", "(its line 2)", "errors: replace")


def test_errors_replace_reads_undecodable_bytes_and_counts_them(tmp_path, llama3_tokenizer_dir):
    """`errors: replace` on a text and a jsonl source: U+FFFD in the data, each replaced byte counted in the
    manifest (two documents with some, 2 x 40 + 2 bytes)."""
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_bytes(b"first line\nsecond caf\xe9 line\n" * 40)
    (books / "b.txt").write_bytes(b"plain words, nothing odd here " * 20)
    web = write_jsonl(tmp_path / "web.jsonl", 50)
    web.write_bytes(web.read_bytes() + b'{"text": "two bad \xff\xfe bytes"}\n')
    out = tmp_path / "data"
    sources = [{"type": "text", "path": str(books), "errors": "replace"},
               {"type": "jsonl", "path": str(web), "errors": "replace"}]
    spec = prepare_config(tmp_path / "data.yaml", llama3_tokenizer_dir, out, {"web": sources}, seq_len=16)
    result = run_command(["prepare", "--config", spec], timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    documents = json.loads((out / "manifest.json").read_text())["domains"]["web"]["documents"]
    assert documents["with_replaced_bytes"] == 2 and documents["replaced_bytes"] == 40 + 2
    assert documents["read"] == 2 + 51
