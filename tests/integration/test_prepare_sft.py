"""`prepare` in sft mode, end to end: chat records (UltraChat columns) in jsonl, jsonl.gz and parquet files written
into tmp_path, rendered with the real Llama-3 chat template, packed, written with litdata, read back and collated
by the real `collate_samples`. Labels are compared with a reference built by hand from the special-token ids and
the encoding of each message's content; document boundaries with the conversations' own boundaries."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from prolong_lit.data.collate import IGNORE_INDEX, collate_samples
from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK, Manifest
from prolong_lit.data.packing import shuffled_order
from prolong_lit.data.prepare import DomainConfig, PrepareConfig, parse_config, prepare, validate
from prolong_lit.data.sources import SourceConfig
from prolong_lit.errors import ConfigError

SEQ_LEN = 128
SEED = 42
BOS, START_HEADER, END_HEADER, EOT, NEWLINES = 128000, 128006, 128007, 128009, 271
ROLE_IDS = {"system": 9125, "user": 882, "assistant": 78191}
WORDS = "the a long river of code under quiet stars where seven small foxes read old maps and sing".split()
ULTRACHAT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "ultrachat.yaml"
MULTI_TURN = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. It has been the capital since 987."},
    {"role": "user", "content": "And its population?\nRoughly, please."},
    {"role": "assistant", "content": "About 2.1 million people live in Paris proper (2023)."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome — ask anytime."},
]


def llama3_reference(tokenizer, messages):
    """Independent reference: BOS, then per message `<|start_header_id|>role<|end_header_id|>` "\\n\\n" content
    `<|eot_id|>`; mask 1 on an assistant message's content tokens and its <|eot_id|>, 0 everywhere else."""
    ids, mask = [BOS], [0]
    for message in messages:
        header = [START_HEADER, ROLE_IDS[message["role"]], END_HEADER, NEWLINES]
        body = tokenizer.encode(message["content"].strip(), add_special_tokens=False) + [EOT]
        ids += header + body
        mask += [0] * len(header) + [int(message["role"] == "assistant")] * len(body)
    return ids, mask


def words(rng, n):
    return " ".join(rng.choice(WORDS, size=n)).capitalize() + "."


def make_conversations() -> list[list[dict]]:
    """30 conversations: the multi-turn example, random ones (optional system, 1-3 turns), two too long."""
    rng = np.random.default_rng(0)
    conversations = [MULTI_TURN]
    for i in range(1, 30):
        messages = [{"role": "system", "content": words(rng, 4)}] if rng.random() < 0.3 else []
        for turn in range(int(rng.integers(1, 4))):
            messages.append({"role": "user", "content": f"#{i}.{turn} " + words(rng, int(rng.integers(2, 10)))})
            messages.append({"role": "assistant", "content": words(rng, int(rng.integers(2, 16)))})
        conversations.append(messages)
    conversations[7][-1]["content"] = words(rng, 150)  # longer than SEQ_LEN: dropped
    conversations[25][-1]["content"] = words(rng, 130)
    return conversations


def write_chat_corpus(root: Path, conversations) -> list[Path]:
    """Records 0-11 in chat.jsonl, 12-17 in chat2.jsonl.gz, 18-29 in chat3.parquet (UltraChat columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": c[-2]["content"], "prompt_id": str(i), "messages": c} for i, c in enumerate(conversations)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    with gzip.open(root / "chat2.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[12:18]))
    pq.write_table(pa.Table.from_pylist(rows[18:]), root / "chat3.parquet")
    return [root / "chat.jsonl", root / "chat2.jsonl.gz", root / "chat3.parquet"]


def make_config(files, output_dir: Path, tokenizer: str, **overrides) -> PrepareConfig:
    domains = {
        "ultrachat": DomainConfig(mode="sft", sources=[SourceConfig("chat", str(f)) for f in files]),
        # chat data packed like short pretraining data (ProLong's Tulu-v2 domain has a mask too)
        "tulu": DomainConfig(mode="concat", sources=[SourceConfig("chat", str(files[0]))]),
    }
    settings = dict(tokenizer=tokenizer, output_dir=str(output_dir), domains=domains, seq_len=SEQ_LEN, num_workers=1)
    return PrepareConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama3_tokenizer_dir):
    root = tmp_path_factory.mktemp("chat")
    conversations = make_conversations()
    files = write_chat_corpus(root, conversations)
    config = make_config(files, root / "out" / "prepared", str(llama3_tokenizer_dir))
    return files, conversations, config, prepare(config)


def read_samples(data_dir):
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(data_dir))
    return [dataset[i] for i in range(len(dataset))]


def snapshot(directory: Path):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_labels_are_exactly_the_assistant_tokens_and_documents_are_conversations(built, llama3_tokenizer):
    files, conversations, config, manifest = built
    refs = [llama3_reference(llama3_tokenizer, c) for c in conversations]
    kept = [ref for ref in refs if len(ref[0]) <= SEQ_LEN]
    queue = [kept[i] for i in shuffled_order(len(kept), SEED, "ultrachat")]  # the conversations, in packing order
    samples = read_samples(Path(config.output_dir) / "ultrachat")
    batch = collate_samples(samples, domain_ids=[0] * len(samples), sample_index=list(range(len(samples))))
    labels, flat_starts, truncated, multi_turn_rows = [], [], 0, 0
    for row, sample in enumerate(samples):
        row_labels, pos = [], 0
        for k, length in enumerate(sample[DOC_LENGTHS].tolist()):
            ids, mask = queue.pop(0)
            # every document is the next conversation, whole, or cut short at the end of a full row
            assert sample[INPUT_IDS][pos : pos + length].tolist() == ids[:length]
            assert length == len(ids) or k == len(sample[DOC_LENGTHS]) - 1
            truncated += len(ids) - length
            expected = [t if m else IGNORE_INDEX for t, m in zip(ids[:length], mask[:length])]
            expected[0] = IGNORE_INDEX  # a document's first token (BOS) is never a label
            row_labels += expected
            flat_starts.append(row * SEQ_LEN + pos)
            multi_turn_rows += ids[:length] == refs[0][0]
            pos += length
        assert pos == SEQ_LEN and sample[LOSS_MASK].dtype == np.uint8
        labels.append(row_labels)
    assert batch.labels.tolist() == labels
    # attention boundaries (cu_seq_lens over the flattened rows) are exactly the conversation starts
    assert batch.cu_seq_lens.tolist() == flat_starts + [len(samples) * SEQ_LEN]
    assert (batch.input_ids.flatten()[flat_starts] == BOS).all()
    starts = np.array(flat_starts)
    assert (batch.position_ids.flatten()[starts] == 0).all() and batch.position_ids.flatten()[1:].ne(0).sum() == (
        len(samples) * SEQ_LEN - len(flat_starts)
    )
    assert multi_turn_rows == 1 and truncated > 0  # the multi-turn example is written whole; some rows cut one
    stats = manifest.domains["ultrachat"]
    assert stats.dropped_tokens == {
        "truncated_remainder": truncated,
        "final_partial_sample": sum(len(ids) for ids, _ in queue),
    }
    assert int(batch.loss_tokens) == sum(lab != IGNORE_INDEX for row in labels for lab in row[1:])


def test_too_long_conversations_are_dropped_and_counted(built, llama3_tokenizer):
    files, conversations, config, manifest = built
    lengths = [len(llama3_reference(llama3_tokenizer, c)[0]) for c in conversations]
    too_long = [i for i, n in enumerate(lengths) if n > SEQ_LEN]
    assert too_long == [7, 25]
    stats = manifest.domains["ultrachat"]
    assert stats.documents == {"read": 30, "kept": 28, "dropped_min_length": 0, "dropped_too_long": 2}
    assert (
        stats.has_loss_mask
        and stats.tokens
        == stats.samples * SEQ_LEN
        == len(read_samples(Path(config.output_dir) / "ultrachat")) * SEQ_LEN
    )
    kept_tokens = sum(n for n in lengths if n <= SEQ_LEN)
    assert stats.tokens + sum(stats.dropped_tokens.values()) == kept_tokens
    assert manifest == Manifest.read(config.output_dir)
    # a chat source in a concat domain: the tail of a cut conversation goes on in the next row, with its mask
    tulu = manifest.domains["tulu"]
    assert tulu.has_loss_mask and tulu.documents == {"read": 12, "kept": 12, "dropped_min_length": 0}
    assert tulu.tokens + tulu.dropped_tokens["final_partial_sample"] == sum(lengths[:12])


def test_loss_on_all_trains_every_token_of_a_chat_source(built, tmp_path, llama3_tokenizer):
    """ProLong's Tulu-v2 domain: a chat source with loss_on: all in a concat domain writes no loss mask, and every
    token is a label but each document's first (BOS)."""
    files, conversations, config, manifest = built
    spec = make_config(files, tmp_path / "all", config.tokenizer)
    spec.domains = {"tulu": DomainConfig(mode="concat", sources=[SourceConfig("chat", str(files[0]), loss_on="all")])}
    stats, masked_stats = prepare(spec).domains["tulu"], manifest.domains["tulu"]
    assert not stats.has_loss_mask and masked_stats.has_loss_mask
    assert (stats.samples, stats.documents, stats.dropped_tokens) == (
        masked_stats.samples, masked_stats.documents, masked_stats.dropped_tokens)
    samples = read_samples(tmp_path / "all" / "tulu")
    assert all(LOSS_MASK not in sample for sample in samples)
    # the same tokens as the masked domain built from the same source; only the mask differs
    masked = read_samples(Path(config.output_dir) / "tulu")
    assert [s[INPUT_IDS].tolist() for s in samples] == [s[INPUT_IDS].tolist() for s in masked]
    batch = collate_samples(samples, domain_ids=[0] * len(samples), sample_index=list(range(len(samples))))
    starts = np.cumsum([0, *np.concatenate([s[DOC_LENGTHS] for s in samples])[:-1]])
    expected = batch.input_ids.flatten().clone()
    expected[starts] = IGNORE_INDEX
    assert batch.labels.flatten().tolist() == expected.tolist()


def test_reruns_are_byte_identical_with_any_worker_count(built, tmp_path):
    files, conversations, config, manifest = built
    again = make_config(files, tmp_path / "again", config.tokenizer, num_workers=2)
    assert prepare(again) == manifest
    first, second = snapshot(Path(config.output_dir)), snapshot(tmp_path / "again")
    assert sorted(first) == sorted(second) and len(first) == 5  # manifest + 2 x (index.json + one chunk)
    for name in first:
        assert first[name] == second[name], name


def _write_bad(root: Path, case: str, files, tokenizer_dir: Path) -> tuple[list, str]:
    """A broken input for `case`; returns the chat files and the tokenizer to use."""
    good = [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})]
    if case == "unknown_role":  # found while tokenizing, after validation read the first record
        bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}
        (root / "bad.jsonl").write_text("\n".join(good * 2 + [json.dumps(bad)]) + "\n")
        return [files[0], root / "bad.jsonl"], str(tokenizer_dir)
    if case == "no_messages":
        (root / "bad.jsonl").write_text(json.dumps({"prompt": "hi", "conversation": []}) + "\n")
        return [root / "bad.jsonl"], str(tokenizer_dir)
    if case == "no_template":
        (root / "tok").mkdir()
        for path in tokenizer_dir.iterdir():
            if path.name != "chat_template.jinja":
                (root / "tok" / path.name).symlink_to(path)
        return files, str(root / "tok")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, error",
    [
        (
            "unknown_role",
            r"^domains\.ultrachat\.sources\[1\]: .*bad\.jsonl line 3 message 1 has unknown role 'tool' "
            r"\(allowed: system, user, assistant\)",
        ),
        (
            "no_messages",
            r"^domains\.ultrachat\.sources\[0\]\.messages_field: .*bad\.jsonl line 1 has no field 'messages'",
        ),
        ("no_template", r"^tokenizer: '.*tok' has no chat template .* domains\.ultrachat \(chat sources\) needs"),
    ],
)
def test_bad_chat_input_fails_before_anything_is_written(built, llama3_tokenizer_dir, tmp_path, case, error):
    files, conversations, config, manifest = built
    (tmp_path / "in").mkdir()
    chat_files, tokenizer = _write_bad(tmp_path / "in", case, files, Path(llama3_tokenizer_dir))
    bad = make_config(chat_files, tmp_path / "out" / "prepared", tokenizer)
    with pytest.raises(ValueError, match=error):
        prepare(bad)
    # no output and no scratch directory left (the parent may have been created for the scratch)
    assert not (tmp_path / "out" / "prepared").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "mode, source, error",
    [
        ("sft", "jsonl", r"^domains\.ultrachat\.sources\[0\]\.type: mode sft reads chat sources only \(got jsonl\)"),
        ("slice", "chat", r"^domains\.ultrachat\.mode: a chat source \(sources\[0\]\) needs mode sft"),
    ],
)
def test_chat_sources_and_sft_mode_go_together(built, tmp_path, mode, source, error):
    files, conversations, config, manifest = built
    bad = make_config(files, tmp_path / "out", config.tokenizer)
    bad.domains["ultrachat"] = DomainConfig(mode=mode, sources=[SourceConfig(source, str(files[0]))])
    with pytest.raises(ValueError, match=error):
        validate(bad)


def test_ultrachat_config_parses_and_names_what_to_fill_in(tmp_path):
    config, overwrite = parse_config(["--config", str(ULTRACHAT_CONFIG), "--output_dir", str(tmp_path / "uc")])
    assert not overwrite and config.seq_len == 65536 and config.seed == 42
    assert "Llama-3-8B-Instruct" in config.tokenizer
    [(name, domain)] = config.domains.items()
    assert (name, domain.mode, domain.min_length) == ("ultrachat", "sft", None)
    [source] = domain.sources
    assert (source.type, source.messages_field, source.pattern) == ("chat", "messages", "train_sft-*.parquet")
    # the placeholder paths are refused by name before anything happens
    with pytest.raises(ConfigError, match=r"^domains\.ultrachat\.sources\[0\]\.path: '.*' does not exist"):
        validate(config)
    assert not (tmp_path / "uc").exists()
