"""Chat sources and chat-template rendering: conversations read from jsonl / jsonl.gz / parquet with their
errors named by file and line, and the assistant-token loss mask on the real Llama-3 tokenizer, checked against
a token list built by hand from the special-token ids and the encoding of each message's content."""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np
import pytest

from prolong_lit.data.chat import check_chat_template, render_conversation
from prolong_lit.data.sources import Conversation, SourceConfig, iter_documents, validate_source

BOS, START_HEADER, END_HEADER, EOT, NEWLINES = 128000, 128006, 128007, 128009, 271
ROLE_IDS = {"system": 9125, "user": 882, "assistant": 78191}

MULTI_TURN = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. It has been the capital since 987."},
    {"role": "user", "content": "And its population?\nRoughly, please."},
    {"role": "assistant", "content": "About 2.1 million people live in Paris proper (2023)."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome — ask anytime. 😊"},
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


def test_special_and_role_token_ids(llama3_tokenizer):
    for role, token_id in ROLE_IDS.items():
        assert llama3_tokenizer.encode(role, add_special_tokens=False) == [token_id]
    assert llama3_tokenizer.encode("\n\n", add_special_tokens=False) == [NEWLINES]
    assert llama3_tokenizer.convert_ids_to_tokens([BOS, START_HEADER, END_HEADER, EOT]) == [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]


def test_llama3_multi_turn_mask_is_exactly_the_assistant_replies(llama3_tokenizer):
    ids, mask = render_conversation(llama3_tokenizer, Conversation(MULTI_TURN, "chat.jsonl line 1"))
    ref_ids, ref_mask = llama3_reference(llama3_tokenizer, MULTI_TURN)
    assert ids.dtype == np.int32 and mask.dtype == np.uint8
    assert ids.tolist() == ref_ids and mask.tolist() == ref_mask
    # the trained tokens decode to the three replies, each closed by <|eot_id|>; no header is trained
    trained = ids[mask == 1].tolist()
    replies = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert llama3_tokenizer.decode(trained) == "".join(reply + "<|eot_id|>" for reply in replies)
    assert trained.count(EOT) == 3 and START_HEADER not in trained and ROLE_IDS["assistant"] not in trained
    # it is also the ids transformers renders for the whole conversation
    assert ids.tolist() == llama3_tokenizer.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=False)


def test_whitespace_is_trimmed_as_the_template_does(llama3_tokenizer):
    messages = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "\n hello there \n"}]
    ids, mask = render_conversation(llama3_tokenizer, Conversation(messages, "x"))
    assert (ids.tolist(), mask.tolist()) == llama3_reference(llama3_tokenizer, messages)
    assert llama3_tokenizer.decode(ids[mask == 1]) == "hello there<|eot_id|>"


def test_conversation_without_reply_and_reply_first(llama3_tokenizer):
    ids, mask = render_conversation(llama3_tokenizer, Conversation([{"role": "user", "content": "hi"}], "x"))
    assert len(ids) == 7 and not mask.any()  # BOS, 4 header tokens, "hi", <|eot_id|>
    with pytest.raises(ValueError, match=r"^f\.jsonl line 3: the conversation opens with an assistant message"):
        render_conversation(llama3_tokenizer, Conversation([{"role": "assistant", "content": "hi"}], "f.jsonl line 3"))


def test_loss_on_all_trains_every_token(llama3_tokenizer, tmp_path):
    """A chat source with loss_on: all (ProLong's Tulu-v2 in pretraining): the same ids, and no loss mask, so
    every token trains as in a text document; the setting travels from the source to each conversation."""
    ids, mask = render_conversation(llama3_tokenizer, Conversation(MULTI_TURN, "x"))
    all_ids, no_mask = render_conversation(llama3_tokenizer, Conversation(MULTI_TURN, "x", loss_on="all"))
    assert all_ids.tolist() == ids.tolist() and all_ids.dtype == np.int32 and no_mask is None and not mask.all()
    write_chat_jsonl(tmp_path / "t.jsonl", [{"messages": MULTI_TURN}])
    source = SourceConfig("chat", str(tmp_path / "t.jsonl"), loss_on="all")
    validate_source(source, "domains.tulu_v2.sources[0]")
    [conversation] = iter_documents(source)
    assert conversation.loss_on == "all" and render_conversation(llama3_tokenizer, conversation)[1] is None
    assert [c.loss_on for c in iter_documents(SourceConfig("chat", str(tmp_path / "t.jsonl")))] == ["assistant"]
    with pytest.raises(ValueError, match=r"^s\.loss_on: 'prompts' is not one of assistant, all"):
        validate_source(SourceConfig("chat", str(tmp_path / "t.jsonl"), loss_on="prompts"), "s")
    (tmp_path / "d.jsonl").write_text('{"text": "plain text"}\n')
    with pytest.raises(ValueError, match=r"^s\.loss_on: only chat sources .* \(a jsonl source trains on all\)"):
        validate_source(SourceConfig("jsonl", str(tmp_path / "d.jsonl"), loss_on="all"), "s")


def test_templates_that_are_not_prefix_stable_or_fail_are_refused(llama3_tokenizer):
    tokenizer = copy.deepcopy(llama3_tokenizer)
    # rewrites the history depending on what follows: the last message is marked
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST: {% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    conversation = Conversation(MULTI_TURN[1:3], "data.parquet row 12")
    with pytest.raises(ValueError, match=r"^tokenizer: the chat template is not prefix-stable on data\.parquet row 12"):
        render_conversation(tokenizer, conversation)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match=r"^data\.parquet row 12: the tokenizer's chat template failed.*alternate"):
        render_conversation(tokenizer, conversation)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"^tokenizer: '/tok' has no chat template .* domains\.sft needs"):
        check_chat_template(tokenizer, "/tok", needed_by="domains.sft")
    check_chat_template(llama3_tokenizer, "llama3", needed_by="domains.sft")


def write_chat_jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def chat(i):
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


def test_chat_source_reads_jsonl_gzip_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # UltraChat's columns: prompt, prompt_id, messages (a list of {content, role} structs)
    write_chat_jsonl(tmp_path / "a.jsonl", [{"prompt": "question 0", "messages": chat(0)}, {"messages": chat(1)}])
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n")  # a blank line is skipped
    write_chat_jsonl(tmp_path / "b.jsonl.gz", [{"messages": chat(2)}], compress=True)
    rows = [{"prompt": f"question {i}", "prompt_id": str(i), "messages": chat(i)} for i in (3, 4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("not a chat file")
    conversations = list(iter_documents(SourceConfig("chat", str(tmp_path))))
    assert [c.messages for c in conversations] == [chat(i) for i in range(5)]
    assert [c.where.split("/")[-1] for c in conversations] == [
        "a.jsonl line 1",
        "a.jsonl line 2",
        "b.jsonl.gz line 1",
        "c.parquet row 1",
        "c.parquet row 2",
    ]
    only_parquet = SourceConfig("chat", str(tmp_path), pattern="*.parquet")
    assert [c.messages for c in iter_documents(only_parquet)] == [chat(3), chat(4)]
    write_chat_jsonl(tmp_path / "other.jsonl", [{"conv": [{"role": "user", "content": "x", "name": "ann"}]}])
    [renamed] = iter_documents(SourceConfig("chat", str(tmp_path / "other.jsonl"), messages_field="conv"))
    assert renamed.messages == [{"role": "user", "content": "x"}]  # only role and content are kept


@pytest.mark.parametrize(
    "record, error",
    [
        ({"text": "no messages"}, r"^s\.messages_field: .*bad\.jsonl line 2 has no field 'messages'"),
        ({"messages": []}, r"^s\.messages_field: .*bad\.jsonl line 2 field 'messages' is not a non-empty list"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
            r"^s: .*bad\.jsonl line 2 message 1 has unknown role 'tool' \(allowed: system, user, assistant\)",
        ),
        ({"messages": [{"content": "x"}]}, r"^s: .*bad\.jsonl line 2 message 0 has unknown role None"),
        ({"messages": [{"role": "user", "content": None}]}, r"^s: .*bad\.jsonl line 2 message 0 \(user\) has no text"),
    ],
)
def test_bad_chat_records_are_named_by_file_and_line(tmp_path, record, error):
    write_chat_jsonl(tmp_path / "bad.jsonl", [{"messages": chat(0)}, record])
    with pytest.raises(ValueError, match=error):
        list(iter_documents(SourceConfig("chat", str(tmp_path / "bad.jsonl")), "s"))


def test_bad_chat_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"^s\.messages_field: .*a\.parquet has no column 'messages'"):
        validate_source(SourceConfig("chat", str(tmp_path / "a.parquet")), "s")
    pq.write_table(pa.Table.from_pylist([{"messages": chat(0)}, {"messages": None}]), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"^s\.messages_field: .*b\.parquet row 2 field 'messages' is not"):
        list(iter_documents(SourceConfig("chat", str(tmp_path / "b.parquet")), "s"))
    (tmp_path / "c.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(ValueError, match=r"^s: .*c\.jsonl line 1 is not valid JSON"):
        validate_source(SourceConfig("chat", str(tmp_path / "c.jsonl")), "s")
