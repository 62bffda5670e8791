"""HELMET's long-document tasks: LongQA (NarrativeQA, InfBench QA and multiple choice) and summarization
(InfBench Sum, Multi-LexSum), read from local exports of the Hugging Face datasets HELMET loads.

Files (under the HELMET data folder; one set for every length) and what each line must hold (extra fields are
ignored):

- `narrativeqa/test.jsonl` and `narrativeqa/train.jsonl`: rows of the HF `narrativeqa` dataset, e.g.
  `load_dataset("narrativeqa")["test"].to_json(...)`: `document.text` str (test only), `question.text` str,
  `answers` non-empty list of {`text` str}. The train split only gives demonstrations, so its `document` may be
  dropped (`remove_columns("document")`), which makes it small.
- `infbench/longbook_{qa,choice,sum}_eng.jsonl`: InfiniteBench's files (`xinrongzhang2022/InfiniteBench`): `id`
  int, `context` str, `input` str, `answer` list of str (or one str), `options` list of 4 str (choice only, with
  `answer[0]` among them).
- `multi_lexsum/validation.jsonl` (the test split) and `multi_lexsum/train.jsonl`: rows of `allenai/multi_lexsum`
  config v20230518: `sources` list of str (validation only), `summary/short` str or null (rows without one are
  dropped, as HELMET does).

What follows HELMET's `data.py`:
- Only long documents: NarrativeQA keeps documents of more than 131,072 tokens, the others of at least 65,536
  (HELMET counts Llama-2 tokens, BOS included; here the evaluation's tokenizer, as every length in this package).
- Sampling: `datasets.Dataset.shuffle(seed)` (numpy's default_rng(seed).permutation) then the first `samples`:
  NarrativeQA shuffles the test split and then keeps long documents; InfBench keeps long documents, then
  shuffles; Multi-LexSum keeps long documents and shuffles only when there are more than `samples`.
- Demonstrations (2 shots) show no document: NarrativeQA's are train questions with their first answer, InfBench's
  are other items of the same file (shuffled with the run's seed, as HELMET), Multi-LexSum's are train summaries.
  HELMET draws NarrativeQA's and Multi-LexSum's unseeded; here they are seeded by the item and the run's seed.
- Context: the document is first cut to L - generation length - 200 tokens (Multi-LexSum: - 300), with
  " ... [the rest of the text is omitted]" appended (the number in HELMET's dataset names, e.g.
  `narrativeqa_7892` at 8K), then the prompt is cut to L - generation length like every HELMET task.
- Prompts: "\\n" before the answer prefix for NarrativeQA, "\\n\\n" for the others; "Answer:" for QA and "Summary:"
  for the summaries. HELMET runs these with the chat template by default (`EvalSettings.use_chat_template`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from prolong_lit.evals import helmet_files as hf
from prolong_lit.evals import prompts

MIN_TOKENS = {
    "narrativeqa": 131073,  # HELMET keeps stories of more than 131,072 tokens, the others of at least 65,536
    "infbench_qa_eng": 65536,
    "infbench_choice_eng": 65536,
    "infbench_sum_eng": 65536,
    "multi_lexsum": 65536,
}
# Tokens kept free for the instructions, demonstrations and question besides the generation (HELMET's names).
RESERVE = {task: 300 if task == "multi_lexsum" else 200 for task in MIN_TOKENS}
SEPARATOR = {task: "\n" if task == "narrativeqa" else "\n\n" for task in MIN_TOKENS}
TASKS = tuple(MIN_TOKENS)


# ---- line schemas ---------------------------------------------------------------------------------------------


def _text_field(r: Mapping, key: str) -> str | None:
    value = r.get(key)
    ok = isinstance(value, Mapping) and isinstance(value.get("text"), str)
    return None if ok else f"field {key!r} must be an object with a string 'text'"


def check_narrativeqa(r: Mapping, with_document: bool = True) -> str | None:
    if with_document and _text_field(r, "document"):
        return _text_field(r, "document")
    if _text_field(r, "question"):
        return _text_field(r, "question")
    answers = r.get("answers")
    ok = isinstance(answers, list) and answers and all(isinstance(a, Mapping) and isinstance(a.get("text"), str)
                                                         for a in answers)
    return None if ok else "field 'answers' must be a non-empty list of objects with a string 'text'"


def check_infbench(r: Mapping, choice: bool = False) -> str | None:
    if not isinstance(r.get("id"), int) or isinstance(r.get("id"), bool):
        return "field 'id' must be an int"
    for key in ("context", "input"):
        if not isinstance(r.get(key), str):
            return f"field {key!r} must be a string"
    answer = r.get("answer")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "field 'answer' must be a string or a non-empty list of strings"
    if choice:
        options = r.get("options")
        if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) for o in options):
            return "field 'options' must be a list of 4 strings"
        if answers[0] not in options:
            return "the answer is not one of the 'options'"
    return None


def check_multi_lexsum(r: Mapping, with_sources: bool = True) -> str | None:
    if r.get("summary/short") is not None and not isinstance(r.get("summary/short"), str):
        return "field 'summary/short' must be a string or null"
    if with_sources:
        sources = r.get("sources")
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            return "field 'sources' must be a list of strings"
    return None


# ---- loading and sampling --------------------------------------------------------------------------------------


def _hf_order(n: int, seed: int) -> list[int]:
    """The order `datasets.Dataset.shuffle(seed=seed)` gives n rows."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def long_enough(tokenizer: PreTrainedTokenizerBase, text: str, min_tokens: int) -> bool:
    """Whether `text` has at least `min_tokens` tokens (BOS included, as HELMET counts); only a prefix of about
    6 characters per needed token is tokenized when that already suffices."""
    head = text[: 6 * min_tokens]
    count = len(tokenizer(head)["input_ids"])
    if count >= min_tokens or len(head) == len(text):
        return count >= min_tokens
    return len(tokenizer(text)["input_ids"]) >= min_tokens


def _normalize(task: str, row: Mapping) -> dict:
    """One test item as the prompt builders read it: context, question, answer (list), id, options."""
    if task == "narrativeqa":
        return {
            "context": row["document"]["text"],
            "question": row["question"]["text"],
            "answer": [a["text"] for a in row["answers"]],
        }
    if task == "multi_lexsum":
        return {"context": "\n\n".join(row["sources"]), "question": "", "answer": [row["summary/short"]]}
    answers = [row["answer"]] if isinstance(row["answer"], str) else list(row["answer"])
    item = {"id": row["id"], "context": row["context"], "question": row["input"], "answer": answers}
    if task == "infbench_choice_eng":
        letter = "ABCD"[row["options"].index(answers[0])]
        item.update(options=prompts.CHOICE_OPTIONS.format(*row["options"]), answer=[letter, f"{letter}. {answers[0]}"])
    return item


def _read(task: str, files: Mapping[str, Path]) -> tuple[list[dict], list[dict]]:
    """(test rows, demonstration pool rows) as read and checked from the files."""
    if task == "narrativeqa":
        test = hf.read_jsonl(files["test"], check_narrativeqa)
        train = hf.read_jsonl(files["train"], partial(check_narrativeqa, with_document=False))
        pool = [{"question": r["question"]["text"], "answer": r["answers"][0]["text"]} for r in train]
        return test, pool
    if task == "multi_lexsum":
        test = hf.read_jsonl(files["test"], check_multi_lexsum)
        train = hf.read_jsonl(files["train"], partial(check_multi_lexsum, with_sources=False))
        pool = [{"answer": r["summary/short"]} for r in train if r["summary/short"] is not None]
        return [r for r in test if r["summary/short"] is not None], pool
    rows = hf.read_jsonl(files["test"], partial(check_infbench, choice=task == "infbench_choice_eng"))
    return rows, []


def load_longdoc(
    task: str, files: Mapping[str, Path], samples: int, seed: int, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[dict], list[dict]]:
    """(the sampled test items in evaluation order, the demonstration pool) of a LongQA / summarization task."""
    rows, pool = _read(task, files)
    items = [_normalize(task, r) for r in rows]
    minimum = MIN_TOKENS[task]
    if task == "narrativeqa":  # shuffle first, then keep long documents (each document is measured once)
        verdict: dict[str, bool] = {}
        chosen = []
        for i in _hf_order(len(items), seed):
            text = items[i]["context"]
            key = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if key not in verdict:
                verdict[key] = long_enough(tokenizer, text, minimum)
            if verdict[key]:
                chosen.append(items[i])
                if len(chosen) == samples:
                    break
        return chosen, pool
    long_items = [item for item in items if long_enough(tokenizer, item["context"], minimum)]
    if task.startswith("infbench"):
        pool = [{k: v for k, v in item.items() if k != "context"} for item in items]  # every row of the file
        return [long_items[i] for i in _hf_order(len(long_items), seed)[:samples]], pool
    if len(long_items) > samples:
        long_items = [long_items[i] for i in _hf_order(len(long_items), seed)[:samples]]
    return long_items, pool


# ---- prompts ----------------------------------------------------------------------------------------------------


def _item_seed(text: str, seed: int) -> int:
    return (int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) + seed) % 2**31


def _demos(task: str, pool: list[dict], item: dict, seed: int, shots: int) -> str:
    if shots == 0:
        return ""
    if task.startswith("infbench"):  # the file's other items, in the order of a shuffle with the run's seed
        others = [d for d in pool if d["id"] != item["id"]]
        chosen = [others[i] for i in _hf_order(len(others), seed)[:shots]]
    else:
        key = item["question"] or item["context"][:1000]
        chosen = [pool[i] for i in _hf_order(len(pool), _item_seed(key, seed))[:shots]]
    if task == "narrativeqa":
        blocks = [prompts.QA_DEMO.format(question=d["question"], answer=d["answer"]) for d in chosen]
        return prompts.NARRATIVEQA_DEMOS.format(demos="\n\n".join(blocks))
    if task == "multi_lexsum":
        blocks = [prompts.SUMMARY_DEMO.format(answer=d["answer"]) for d in chosen]
        return prompts.MULTI_LEXSUM_DEMOS.format(demos="\n\n".join(blocks))
    if task == "infbench_qa_eng":
        blocks = [prompts.INFBENCH_QA_DEMO.format(question=d["question"], answer=d["answer"][0]) for d in chosen]
    elif task == "infbench_choice_eng":
        blocks = [
            prompts.INFBENCH_CHOICE_DEMO.format(question=d["question"], options=d["options"], answer=d["answer"][0])
            for d in chosen
        ]
    else:
        blocks = [prompts.INFBENCH_SUM_DEMO.format(answer=d["answer"][0].strip()) for d in chosen]
    return prompts.INFBENCH_DEMOS.format(demos="\n\n".join(blocks))


USER_TEMPLATES = {
    "narrativeqa": prompts.NARRATIVEQA_USER,
    "infbench_qa_eng": prompts.INFBENCH_QA_USER,
    "infbench_choice_eng": prompts.INFBENCH_CHOICE_USER,
    "infbench_sum_eng": prompts.INFBENCH_SUM_USER,
    "multi_lexsum": prompts.MULTI_LEXSUM_USER,
}


def longdoc_parts(task: str, pool: list[dict], item: dict, seed: int, shots: int):
    """(user template with the context left open, answer prefix, context, target, meta) of one item."""
    fields = {"demo": _demos(task, pool, item, seed, shots)}
    template = USER_TEMPLATES[task]
    if "{question}" in template:
        fields["question"] = item["question"]
    if task == "infbench_choice_eng":
        fields["options"] = item["options"]
    prefix = prompts.SUMMARY_PREFIX if task in ("infbench_sum_eng", "multi_lexsum") else prompts.ANSWER_PREFIX
    user = partial(template.format, **fields)
    return user, prefix, item["context"], list(item["answer"]), {"question": item["question"]}
