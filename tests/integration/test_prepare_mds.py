"""`prepare` in mode rows on MDS datasets written by mosaicml-streaming's MDSWriter (tests/fixtures/mds/), read
back with litdata, through the MixtureDataModule (collate -> PackedBatch), and trained on by a tiny Llama.

The reference is each fixture's `.npz`: the rows exactly as the fixture script generated them, not our reader.
Expected documents follow the rule of mode rows (data/rows.py): each [start, end) span is a document, and each
run of tokens no span covers is a document of its own that is never trained on.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from prolong_lit.constants import IGNORE_INDEX
from prolong_lit.data.datamodule import MixtureDataModule
from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK, Manifest
from prolong_lit.data.prepare import DomainConfig, PrepareConfig, prepare
from prolong_lit.data.sources import SourceConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mds"
DOMAINS = {"pretrain": False, "zstd": False, "gaps": True, "sft": True}  # name -> has a loss mask
SEQ_LEN = 64


def expected_rows(name: str) -> list[dict]:
    """The fixture's rows as generated: input_ids, document lengths, the positions trained on (0/1)."""
    reference = np.load(FIXTURES / f"{name}.npz")
    spans = np.split(reference["spans"].astype(int), np.cumsum(reference["span_counts"])[:-1])
    rows = []
    for i, (ids, row_spans) in enumerate(zip(reference["input_ids"], spans)):
        train = reference["mask"][i].astype(bool) if "mask" in reference else np.ones(SEQ_LEN, bool)
        lengths, pos = [], 0
        for start, end in row_spans:
            if start > pos:  # uncovered: a document of its own, not trained on
                lengths.append(start - pos)
                train[pos:start] = False
            lengths.append(end - start)
            pos = end
        if pos < SEQ_LEN:
            lengths.append(SEQ_LEN - pos)
            train[pos:] = False
        labels = ids.astype(np.int64)
        labels[np.cumsum([0, *lengths[:-1]])] = IGNORE_INDEX
        labels[~train] = IGNORE_INDEX
        rows.append({"input_ids": ids.astype(np.int64), "doc_lengths": lengths, "train": train, "labels": labels})
    return rows


def mds_config(output_dir: Path, tokenizer: str, domains: dict[str, Path], **overrides) -> PrepareConfig:
    settings = dict(
        tokenizer=tokenizer, output_dir=str(output_dir), seq_len=SEQ_LEN, num_workers=2,
        domains={name: DomainConfig(mode="rows", sources=[SourceConfig("mds", str(path))])
                 for name, path in domains.items()},
    )
    return PrepareConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama3_tokenizer_dir) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("mds") / "prepared"
    manifest = prepare(mds_config(out, str(llama3_tokenizer_dir), {name: FIXTURES / name for name in DOMAINS}))
    return out, manifest


def test_every_row_comes_out_of_prepare_as_stored(built):
    from litdata import StreamingDataset

    out, manifest = built
    for name, has_mask in DOMAINS.items():
        expected = expected_rows(name)
        stats = manifest.domains[name]
        assert (stats.samples, stats.tokens, stats.has_loss_mask) == (len(expected), len(expected) * SEQ_LEN, has_mask)
        uncovered = sum(int((~r["train"]).sum()) for r in expected) if name == "gaps" else 0
        assert stats.dropped_tokens == {"uncovered": uncovered}
        assert stats.max_token_id == max(int(r["input_ids"].max()) for r in expected)
        dataset = StreamingDataset(input_dir=str(out / name))
        assert len(dataset) == len(expected)
        for i, want in enumerate(expected):
            sample = dataset[i]
            assert sample[INPUT_IDS].dtype == np.int32 and sample[DOC_LENGTHS].dtype == np.int32
            np.testing.assert_array_equal(sample[INPUT_IDS], want["input_ids"], err_msg=f"{name} row {i}")
            assert sample[DOC_LENGTHS].tolist() == want["doc_lengths"], f"{name} row {i}"
            assert (LOSS_MASK in sample) == has_mask
            if has_mask:
                assert sample[LOSS_MASK].dtype == np.uint8
                np.testing.assert_array_equal(sample[LOSS_MASK].astype(bool), want["train"], err_msg=f"{name} {i}")
    assert manifest.domains["gaps"].documents["uncovered_gaps"] == 12  # 6 per 5 rows (make_fixtures.py)


def check_batch(batch, references: dict[bytes, dict]) -> list[bytes]:
    """Every row of a PackedBatch equals its reference row: tokens, document boundaries, positions, labels.
    Returns the rows' keys (their token bytes)."""
    keys = []
    bounds = batch.cu_seq_lens.tolist()
    for b in range(batch.input_ids.shape[0]):
        key = batch.input_ids[b].numpy().astype(np.int64).tobytes()
        want = references[key]
        row_bounds = [x - b * SEQ_LEN for x in bounds if b * SEQ_LEN <= x <= (b + 1) * SEQ_LEN]
        assert row_bounds == np.cumsum([0, *want["doc_lengths"]]).tolist()
        assert batch.position_ids[b].tolist() == [p for n in want["doc_lengths"] for p in range(n)]
        np.testing.assert_array_equal(batch.labels[b].numpy(), want["labels"])
        keys.append(key)
    assert int(batch.loss_tokens) == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    return keys


def test_every_row_comes_out_of_the_datamodule_with_its_documents_and_mask(built):
    out, _ = built
    references = {r["input_ids"].tobytes(): r for name in DOMAINS for r in expected_rows(name)}
    data = MixtureDataModule(str(out), {name: 1.0 for name in DOMAINS}, seq_len=SEQ_LEN, micro_batch_size=2,
                             val_samples_per_domain=2, num_workers=0)
    data.setup("fit")
    stream = data.train_stream(rank=0, world_size=1)
    seen = [key for m in range(100) for key in check_batch(stream.micro_batch(m), references)]
    seen += [key for m in range(len(data.val_stream(0, 1))) for key in check_batch(data.val_stream(0, 1).batch(m),
                                                                                   references)]
    assert set(seen) == set(references)  # 200 samples: every domain's items at least once, and the held-out ones


def test_reruns_are_byte_identical_with_any_worker_count(built, tmp_path, llama3_tokenizer_dir):
    out, _ = built
    again = tmp_path / "again"
    prepare(mds_config(again, str(llama3_tokenizer_dir), {name: FIXTURES / name for name in DOMAINS},
                       num_workers=0))
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for path in files:
        assert (out / path).read_bytes() == (again / path).read_bytes(), path


class Recorder(Callback):
    """The micro-batches and step losses of a fit."""

    def __init__(self):
        self.batches, self.losses = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_fit_trains_on_the_converted_rows_with_the_sft_mask(built):
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.optim import AdamW
    from prolong_lit.model.settings import LlamaSettings

    out, _ = built
    references = {r["input_ids"].tobytes(): r for name in DOMAINS for r in expected_rows(name)}
    seed_everything(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny"), seq_len=SEQ_LEN,
                           optimizer=functools.partial(AdamW, lr=3e-3))
    data = MixtureDataModule(str(out), {name: 1.0 for name in DOMAINS}, seq_len=SEQ_LEN, micro_batch_size=4,
                             val_samples_per_domain=0, num_workers=0)
    recorder = Recorder()
    trainer = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, precision="32-true", callbacks=[recorder])
    trainer.fit(module, datamodule=data)

    assert len(recorder.batches) == 4 and all(np.isfinite(recorder.losses))
    assert sum(batch.input_ids.numel() for batch in recorder.batches) == 4 * 4 * SEQ_LEN
    for batch in recorder.batches:
        keys = check_batch(batch, references)
        # exact loss tokens: the targets of positions 0..L-2 that the reference trains on (not a document start)
        expected = sum(int((references[k]["labels"][1:] != IGNORE_INDEX).sum()) for k in keys)
        assert int(batch.loss_tokens) == int(batch.step_loss_tokens) == expected
    # the loss covers exactly the reference's trained positions of an sft row, and nothing else
    sft = {r["input_ids"].tobytes() for r in expected_rows("sft")}
    batch = next(b for b in recorder.batches if any(k in sft for k in check_batch(b, references)))
    module.eval()
    with torch.no_grad():
        loss_sum, count = module.compute_loss_sum(batch)
        logits = module.model.lm_head(module(batch))[:, :-1]  # position t predicts token t + 1
        targets = torch.stack([torch.from_numpy(references[k]["labels"][1:])
                               for k in check_batch(batch, references)])
        trained = targets != IGNORE_INDEX
        manual = torch.nn.functional.cross_entropy(logits[trained], targets[trained], reduction="sum")
    assert int(count) == int(trained.sum())
    torch.testing.assert_close(loss_sum, manual, rtol=1e-4, atol=1e-4)


def corrupt(tmp_path: Path, case: str) -> Path:
    """A copy of a fixture with one defect."""
    if (FIXTURES / "bad" / case).is_dir():
        return FIXTURES / "bad" / case
    data = Path(shutil.copytree(FIXTURES / "pretrain", tmp_path / case))
    shard = data / "proc01-02" / "shard.00001.mds"
    if case == "missing_index":
        (data / "index.json").unlink()
    elif case == "missing_shard":
        shard.unlink()
    elif case == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif case == "truncated_index_agrees":
        shard.write_bytes(shard.read_bytes()[:-7])
        index = json.loads((data / "index.json").read_text())
        entry = next(s for s in index["shards"] if s["raw_data"]["basename"] == "proc01-02/shard.00001.mds")
        entry["raw_data"]["bytes"] -= 7
        (data / "index.json").write_text(json.dumps(index))
    return data


BAD_SAMPLE = r"domains\.x\.sources\[0\]\.path: .*bad/{case}/shard\.00000\.mds sample 1: "


@pytest.mark.parametrize(
    "case, error",
    [
        ("missing_index", r"domains\.x\.sources\[0\]\.path: .*missing_index' holds no index\.json"),
        ("missing_shard", r"domains\.x\.sources\[0\]\.path: .*proc01-02/shard\.00001\.mds: shard file .* not exist"),
        ("truncated", r"proc01-02/shard\.00001\.mds: the file has \d+ bytes, the index says \d+"),
        ("truncated_index_agrees", r"proc01-02/shard\.00001\.mds: corrupt header"),
        ("pkl_indices", r"bad/pkl_indices/shard\.00000\.mds: column 'indices' has encoding 'pkl'"),
        ("overlapping", BAD_SAMPLE + r"indices\[1\] = \[30, 64\) overlaps"),
        ("unsorted", BAD_SAMPLE + r"indices\[1\] = \[0, 32\) is out of order"),
        ("past_row", BAD_SAMPLE + r"indices\[1\] = \[32, 72\) runs past the row"),
        ("wrong_length", BAD_SAMPLE + "a row of 32 tokens; seq_len is 64"),
        ("token_id", BAD_SAMPLE + "token id 128256 at position 0 is outside the tokenizer's vocabulary"),
        ("length_mismatch", BAD_SAMPLE + "column 'length' says 65 tokens, the row holds 64"),
    ],
)
def test_bad_input_fails_before_anything_is_written(built, tmp_path, llama3_tokenizer_dir, case, error):
    data = corrupt(tmp_path, case)
    out = tmp_path / "out" / "prepared"
    with pytest.raises((ValueError, FileNotFoundError), match=error.format(case=case)):
        prepare(mds_config(out, str(llama3_tokenizer_dir), {"x": data}))
    assert not out.exists() and not list((tmp_path / "out").glob(".*work*"))
    # an existing prepared directory is left as it was, even with --overwrite
    existing, _ = built
    before = {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    with pytest.raises((ValueError, FileNotFoundError), match=error.format(case=case)):
        prepare(mds_config(existing, str(llama3_tokenizer_dir), {"x": data}), overwrite=True)
    assert {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "domain, error",
    [
        (DomainConfig(mode="rows", sources=[SourceConfig("jsonl", "x.jsonl")]),
         r"domains\.x\.sources\[0\]\.type: mode rows reads mds sources only \(got jsonl\)"),
        (DomainConfig(mode="concat", sources=[SourceConfig("mds", str(FIXTURES / "zstd"))]),
         r"domains\.x\.sources\[0\]\.type: an mds source .* needs mode rows \(got mode concat\)"),
        (DomainConfig(mode="rows", min_length=8, sources=[SourceConfig("mds", str(FIXTURES / "zstd"))]),
         r"domains\.x\.min_length: mode rows keeps every stored row as it is"),
        (DomainConfig(mode="rows", sources=[SourceConfig("mds", str(FIXTURES / "nowhere"))]),
         r"domains\.x\.sources\[0\]\.path: .*nowhere' is not a directory"),
        (DomainConfig(mode="rows", sources=[SourceConfig("mds", str(FIXTURES / "sft"), loss_on="none")]),
         r"domains\.x\.sources\[0\]\.loss_on: 'none' is not one of assistant, all"),
    ],
)
def test_mode_rows_and_mds_sources_go_together(tmp_path, llama3_tokenizer_dir, domain, error):
    config = mds_config(tmp_path / "out", str(llama3_tokenizer_dir), {})
    config.domains = {"x": domain}
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        prepare(config)
    assert not (tmp_path / "out").exists()


def test_loss_on_all_trains_on_every_token_of_the_spans(tmp_path, llama3_tokenizer_dir):
    from litdata import StreamingDataset

    config = mds_config(tmp_path / "out", str(llama3_tokenizer_dir), {})
    config.domains = {
        "sft": DomainConfig(mode="rows", sources=[SourceConfig("mds", str(FIXTURES / "sft"), loss_on="all")]),
        "gaps": DomainConfig(mode="rows", sources=[SourceConfig("mds", str(FIXTURES / "gaps"), loss_on="all")]),
    }
    manifest = prepare(config)
    assert not manifest.domains["sft"].has_loss_mask  # the stored mask is not read
    assert manifest.domains["gaps"].has_loss_mask  # uncovered tokens belong to no document: still never trained on
    dataset = StreamingDataset(input_dir=str(tmp_path / "out" / "sft"))
    for i, want in enumerate(expected_rows("sft")):
        assert LOSS_MASK not in dataset[i] and dataset[i][DOC_LENGTHS].tolist() == want["doc_lengths"]
