"""HELMET's file-based tasks: JSON KV, RAG (NQ, TriviaQA, HotpotQA, PopQA), MS MARCO re-ranking, ICL, and (in
`longdoc` and `citations`) LongQA, summarization and ALCE citations.

`load_helmet_task` reads and checks the files (file schemas in `helmet_files`) and samples the test items;
`build_helmet_example` turns one sampled item into a prompt that fits `budget` tokens (HELMET's budget is the
evaluation length minus the generation length), cutting only the context from its end.

What follows HELMET's `data.py`:
- Sampling: JSON KV (and HELMET's RULER files, `ruler_files`) keep the first `samples` items of the order of
  `datasets.Dataset.shuffle(seed)` (numpy's default_rng(seed) permutation); ICL, when the test split has more than
  `samples` items, shuffles it that way and then draws `samples` items label-balanced (`balance_labels` seeded with
  `seed`), as HELMET's `load_icl`; RAG and re-ranking sample
  `samples` distinct questions (key `id`, else `question`; `qid` for MS MARCO) and keep every depth/shuffle
  variant of each, so a RAG run has up to 6x `samples` prompts, as HELMET's 100 questions give 600.
- Demonstrations (2 shots): JSON KV takes the record's first two `demos`; RAG and re-ranking shuffle the demo
  file with seed sha256(key) mod 2^31 (numpy's default_rng permutation, as `datasets.Dataset.shuffle`), drop
  repeated keys and keep the first two (PopQA and MS MARCO never use the test item itself).
- ICL: label-balanced demonstrations drawn per test item from the train split, with labels mapped to a shuffled
  set of integers, both seeded with sha256(text) + seed. (HELMET's code seeds the demo draw with the run seed
  only; its changelog says demos differ per item, which is what is done here.)
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from prolong_lit.errors import ConfigError
from prolong_lit.evals import citations, longdoc, prompts, ruler_files
from prolong_lit.evals import helmet_files as hf
from prolong_lit.evals.results import EvalExample


@dataclass
class HelmetTaskData:
    """The checked, sampled content of one HELMET task at one length."""

    task: str
    length: int
    seed: int
    records: list[dict]  # the sampled test items, in evaluation order
    demos: list[dict] = field(default_factory=list)  # the demonstration pool (ICL: the train split)
    demos_exclude_self: bool = True  # whether each item's own key must be removed from the pool
    labels: list = field(default_factory=list)  # ICL: the sorted class labels
    prompt_file: dict = field(default_factory=dict)  # ALCE: HELMET's prompt file (instruction, formats, demos)


# What was read for each (task, length) of an evaluation: read once when its settings are checked, then reused.
HelmetData = dict[tuple[str, int], HelmetTaskData]


def _sha_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 2**31


def _depth(record: dict) -> float | None:
    depth = record.get("depth")
    if depth is None:
        return None
    return float(depth) / 100.0 if depth > 1 else float(depth)


def _sample_by_key(records: list[dict], key: str, samples: int, seed: int) -> list[dict]:
    keys = sorted({r[key] for r in records})
    chosen = set(random.Random(seed).sample(keys, min(samples, len(keys))))
    return [r for r in records if r[key] in chosen]


def _hf_shuffled(records: list[dict], seed: int) -> list[dict]:
    """`datasets.Dataset.shuffle(seed=seed)`: the order of numpy's default_rng(seed).permutation."""
    return [records[int(i)] for i in np.random.default_rng(seed).permutation(len(records))]


def _rag_key(records: list[dict]) -> str:
    return "id" if all("id" in r for r in records) else "question"


# LongQA / summarization read the same files at every length: what was read and sampled is kept for the next one.
_LONGDOC_READ: dict[tuple, tuple[list[dict], list[dict]]] = {}


def _load_longdoc(task: str, files: dict[str, Path], samples: int, seed: int, tokenizer) -> tuple[list, list]:
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files.values() if f.is_file())
    key = (task, stamp, samples, seed, id(tokenizer), len(tokenizer))
    if key not in _LONGDOC_READ:
        if len(_LONGDOC_READ) >= 8:
            _LONGDOC_READ.clear()
        _LONGDOC_READ[key] = longdoc.load_longdoc(task, files, samples, seed, tokenizer)
    return _LONGDOC_READ[key]


def load_helmet_task(
    task: str,
    helmet_dir: str | Path,
    length: int,
    samples: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> HelmetTaskData:
    """Read, check and sample `task`'s files for `length`; raises on a missing file or a malformed line.
    `tokenizer` (the evaluation's) is needed by the LongQA / summarization tasks, which keep long documents only."""
    if task in ruler_files.FILE_TASKS:  # HELMET's RULER files: one test file, HELMET's sampling
        return HelmetTaskData(task, length, seed, ruler_files.read_task(task, helmet_dir, length, samples, seed))
    root = hf.resolve_helmet_dir(helmet_dir)
    files = {role: hf.locate(root, rel) for role, rel in hf.task_files(task, length).items()}
    if task in longdoc.TASKS:
        if tokenizer is None:
            raise TypeError(f"load_helmet_task({task!r}) needs the tokenizer: it keeps long documents only")
        records, pool = _load_longdoc(task, files, samples, seed, tokenizer)
        return HelmetTaskData(task, length, seed, list(records), list(pool))
    if task in citations.TASKS:
        records, prompt_file = citations.load_alce(task, files, samples, seed)
        return HelmetTaskData(task, length, seed, records, prompt_file=prompt_file)
    if task == "helmet_json_kv":
        records = hf.read_jsonl(files["test"], hf.check_json_kv)
        return HelmetTaskData(task, length, seed, _hf_shuffled(records, seed)[:samples])  # HELMET's selection
    if task in hf.RAG_FILES:
        popqa = "popqa" in task
        test = hf.read_jsonl(files["test"], lambda r: hf.check_rag(r, popqa))
        demos = hf.read_jsonl(files["demo"], lambda r: hf.check_rag(r, popqa))
        if popqa:  # kilt_popqa_3: long-tail entities only, log10(s_pop) < 3
            threshold = float(task.rsplit("_", 1)[-1])
            test, demos = (
                [r for r in rs if r["s_pop"] <= 0 or math.log10(r["s_pop"]) < threshold] for rs in (test, demos)
            )
        records = _sample_by_key(test, _rag_key(test), samples, seed)
        return HelmetTaskData(task, length, seed, records, demos, demos_exclude_self=popqa)
    if task == "msmarco_rerank_psg":
        test = hf.read_jsonl(files["test"], hf.check_rerank)
        demos = hf.read_jsonl(files["demo"], hf.check_rerank)
        records = _sample_by_key(test, "qid", samples, seed)
        exclude_self = True
        if len(demos) > 2 * len(records):  # HELMET filters the test queries out of the pool once
            test_qids = {r["qid"] for r in records}
            demos, exclude_self = [d for d in demos if d["qid"] not in test_qids], False
        return HelmetTaskData(task, length, seed, records, demos, demos_exclude_self=exclude_self)
    if task in hf.ICL_TASKS:
        train = hf.read_jsonl(files["train"], hf.check_icl)
        test = hf.read_jsonl(files["test"], hf.check_icl)
        labels = sorted({r["label"] for r in train + test}, key=lambda x: (isinstance(x, str), x))
        if len(test) > samples:  # HELMET: shuffle, then a label-balanced draw of `samples` test items
            test = balance_labels(_hf_shuffled(test, seed), samples, random.Random(seed))
        return HelmetTaskData(task, length, seed, test, train, labels=labels)
    raise ConfigError(f"unknown HELMET task {task!r}; known: {list(hf.HELMET_TASKS)}")


def _pick_demos(pool: list[dict], key: str, item_key: str, exclude_self: bool, shots: int) -> list[dict]:
    """HELMET's demo choice: shuffle with seed sha256(item key), drop repeated keys, take the first `shots`."""
    if exclude_self:
        pool = [d for d in pool if d[key] != item_key]
    chosen, seen = [], set()
    for i in np.random.default_rng(_sha_seed(item_key)).permutation(len(pool)):
        demo = pool[int(i)]
        if demo[key] not in seen:
            seen.add(demo[key])
            chosen.append(demo)
            if len(chosen) == shots:
                break
    return chosen


def balance_labels(train: list[dict], shots: int, rand: random.Random) -> list[dict]:
    """HELMET's label-balanced demo draw: rounds of one item per label, each round shuffled, cut to `shots`."""
    by_label: dict = {}
    for item in train:
        by_label.setdefault(item["label"], []).append(item)
    rounds = math.ceil(shots / len(by_label))
    table: list[list[dict]] = [[] for _ in range(rounds)]
    for items in by_label.values():
        picks = rand.sample(range(len(items)), rounds % len(items))
        while len(picks) < rounds:  # fewer items than rounds: draw again (with replacement across draws)
            picks += rand.sample(range(len(items)), min(rounds - len(picks), len(items)))
        for r, idx in enumerate(picks):
            table[r].append(items[idx])
    for row in table:
        rand.shuffle(row)
    return [item for row in table for item in row][:shots]


def _json_kv_parts(data: HelmetTaskData, record: dict, shots: int):
    demos = prompts.json_kv_demos([tuple(d) for d in record["demos"][:shots]])
    question = record["question"]
    user = partial(prompts.JSON_KV_USER.format, demos=demos, question=question)
    return user, prompts.JSON_KV_PREFIX, record["context"], [record["answer"]], {"question": question}


def _rag_parts(data: HelmetTaskData, record: dict, shots: int):
    key = _rag_key(data.records)
    demos = prompts.rag_demos(_pick_demos(data.demos, key, record[key], data.demos_exclude_self, shots))
    question = record["question"]
    user = partial(prompts.RAG_USER.format, demos=demos, question=question)
    context = prompts.rag_passages(record["ctxs"])
    return user, prompts.RAG_PREFIX, context, list(record["answers"]), {"question": question}


def _rerank_parts(data: HelmetTaskData, record: dict, shots: int):
    demos = prompts.rerank_demos(_pick_demos(data.demos, "qid", record["qid"], data.demos_exclude_self, shots))
    question = record["query"]
    user = partial(prompts.RERANK_USER.format, demos=demos, question=question)
    qrels = {c["id"]: int(c["label"]) for c in record["ctxs"]}
    meta = {"question": question, "gold_ranking": prompts.gold_ranking(record["ctxs"])}
    return user, prompts.RERANK_PREFIX, prompts.rerank_passages(record["ctxs"]), qrels, meta


def _icl_parts(data: HelmetTaskData, record: dict, shots: int):
    """The demonstrations are the context here, so they are what truncation cuts."""
    local_seed = (_sha_seed(record["text"]) + data.seed) % 2**31
    shot_count = hf.ICL_SHOTS[hf.ICL_TASKS[data.task]][hf.helmet_length(data.length)]
    demo_items = balance_labels(data.demos, shot_count, random.Random(local_seed))
    mapping = list(range(len(data.labels)))
    random.Random(local_seed).shuffle(mapping)  # class i is shown as the integer mapping[i]
    label_id = {label: mapping[i] for i, label in enumerate(data.labels)}
    context = prompts.icl_context([(d["text"], str(label_id[d["label"]])) for d in demo_items])
    question = record["text"]
    user = partial(prompts.ICL_USER.format, question=question)
    return user, prompts.ICL_PREFIX, context, [str(label_id[record["label"]])], {"question": question}


def _parts_for(task: str):
    """The family's builder: (data, record, shots) -> (user template with the context left open, answer prefix,
    context, target, meta)."""
    if task == "helmet_json_kv":
        return _json_kv_parts
    if task in hf.RAG_FILES:
        return _rag_parts
    if task == "msmarco_rerank_psg":
        return _rerank_parts
    if task in hf.ICL_TASKS:
        return _icl_parts
    if task in ruler_files.FILE_TASKS:
        return ruler_files.file_parts
    if task in longdoc.TASKS:
        return lambda data, record, shots: longdoc.longdoc_parts(data.task, data.demos, record, data.seed, shots)
    if task in citations.TASKS:
        return lambda data, record, shots: citations.alce_parts(
            data.task, data.prompt_file, record, data.length, data.seed, shots
        )
    raise ConfigError(f"unknown HELMET task {task!r}; known: {list(hf.HELMET_TASKS)}")


def build_helmet_example(
    data: HelmetTaskData,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    budget: int,
    shots: int = 2,
    chat: bool = False,
) -> EvalExample:
    """The prompt of test item `index`, cut to at most `budget` tokens (context only); with `chat`, rendered in
    the tokenizer's chat template (HELMET's `use_chat_template`)."""
    record = data.records[index]
    user, prefix, context, target, meta = _parts_for(data.task)(data, record, shots)
    if data.task in longdoc.TASKS:  # HELMET's first cut of the document, to the length in its dataset names
        context = prompts.cut_document(tokenizer, context, budget - longdoc.RESERVE[data.task])
    sep = longdoc.SEPARATOR.get(data.task, "\n\n" if data.task in citations.TASKS else "\n")
    prompt, ids, kept = prompts.truncate_context(
        tokenizer,
        lambda ctx: prompts.render_prompt(tokenizer, user(context=ctx), prefix, chat, sep),
        context,
        budget,
        f"{data.task}@{data.length}",
        chat=chat,
    )
    meta.update(context_chars=len(context), kept_context_chars=len(kept))
    return EvalExample(
        task=data.task,
        length=data.length,
        index=index,
        prompt=prompt,
        input_ids=ids,
        target=target,
        depth=_depth(record),
        meta=meta,
    )
