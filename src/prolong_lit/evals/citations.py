"""HELMET's citation tasks: ALCE ASQA and QAMPARI, answered from retrieved passages with `[n]` citations.

Files (under the HELMET data folder, the same at every length):
- `alce/{asqa,qampari}_eval_gtr_top2000.json` (HELMET's tarball): one JSON array (or `{"data": [...]}`) of items
  with `question` str, `docs` list of {`title` str, `text` str, ...} (the retrieved passages, best first), and
  ASQA's `qa_pairs` list of {`short_answers` list of str, ...} or QAMPARI's `answers` list of lists of aliases.
- `prompts/{asqa,qampari}_revised.json` (HELMET's repository, found in the data folder or its parent):
  `instruction`, `demo_prompt` (fields instruction, question, context, answer), `doc_prompt` (fields ID, title,
  text) and `demos`, a list of {`question`, `answer`, `docs`}.

What follows HELMET's `data.py` (`load_alce`) and configs:
- the prompt shows the first K passages, K = 8/30/75/165/345/700 at 4K/8K/16K/32K/64K/128K (HELMET's dataset
  names `alce_asqa_30` ...), each `doc_prompt` with ID = its 1-based position, joined by blank lines;
- 2 demonstrations from the prompt file, each with all its passages, rendered by `demo_prompt` and joined by
  two blank lines; HELMET draws them with the process-wide `random.sample`, here seeded by the question and the
  run's seed;
- test items: `datasets.Dataset.shuffle(seed)` of the file, the first `samples`;
- the prompt: demos, the instruction, "Question: ...", the passages, then "\\n\\nAnswer:"; 300 new tokens, budget
  L - 300 (passages cut from the end); the chat template is on by default in HELMET's config.
Scores (`metrics.AlceScore`): ASQA's str_em, QAMPARI's rec@5, and citation recall/precision when an NLI model
is given (`nli`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np

from prolong_lit.errors import DataError
from prolong_lit.evals import helmet_files as hf
from prolong_lit.evals import prompts

DOCS = dict(zip(hf.HELMET_LENGTHS, (8, 30, 75, 165, 345, 700)))
TASKS = tuple(hf.ALCE_FILES)


def _docs_problem(docs) -> str | None:
    if not isinstance(docs, list) or not all(
        isinstance(d, Mapping) and isinstance(d.get("title"), str) and isinstance(d.get("text"), str) for d in docs
    ):
        return "field 'docs' must be a list of passages with a string 'title' and 'text'"
    return None


def check_asqa(r: Mapping) -> str | None:
    if not isinstance(r.get("question"), str):
        return "field 'question' must be a string"
    pairs = r.get("qa_pairs")
    if not isinstance(pairs, list) or not pairs or not all(
        isinstance(p, Mapping) and isinstance(p.get("short_answers"), list)
        and all(isinstance(a, str) for a in p["short_answers"]) for p in pairs
    ):
        return "field 'qa_pairs' must be a non-empty list of objects with a list of string 'short_answers'"
    return _docs_problem(r.get("docs"))


def check_qampari(r: Mapping) -> str | None:
    if not isinstance(r.get("question"), str):
        return "field 'question' must be a string"
    answers = r.get("answers")
    if not isinstance(answers, list) or not answers or not all(
        isinstance(a, list) and a and all(isinstance(x, str) for x in a) for a in answers
    ):
        return "field 'answers' must be a non-empty list of non-empty lists of strings (the aliases)"
    return _docs_problem(r.get("docs"))


def check_prompt_file(r: Mapping) -> str | None:
    for key in ("instruction", "demo_prompt", "doc_prompt"):
        if not isinstance(r.get(key), str):
            return f"field {key!r} must be a string"
    demos = r.get("demos")
    if not isinstance(demos, list) or not all(
        isinstance(d, Mapping) and isinstance(d.get("question"), str) and isinstance(d.get("answer"), str)
        and not _docs_problem(d.get("docs")) for d in demos
    ):
        return "field 'demos' must be a list of {question, answer, docs} objects"
    return None


def load_alce(task: str, files: Mapping[str, Path], samples: int, seed: int) -> tuple[list[dict], dict]:
    """(the sampled test items in evaluation order, the prompt file's content) of `alce_asqa` / `alce_qampari`."""
    check = check_asqa if task == "alce_asqa" else check_qampari
    items = hf.read_json_list(files["test"], check)
    prompt = hf.read_json_object(files["prompt"], check_prompt_file)
    order = np.random.default_rng(seed).permutation(len(items))[:samples]
    return [items[int(i)] for i in order], prompt


def _render_docs(doc_prompt: str, docs: list[Mapping], where: str) -> str:
    try:
        return "\n\n".join(doc_prompt.format(**d, ID=i + 1) for i, d in enumerate(docs))
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"{where}: 'doc_prompt' names a field the passages lack ({err})") from None


def _seed(question: str, seed: int) -> int:
    return (int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) + seed) % 2**31


def alce_parts(task: str, prompt: dict, item: dict, length: int, seed: int, shots: int):
    """(user template with the context left open, answer prefix, context, target, meta) of one item."""
    doc_prompt, instruction = prompt["doc_prompt"], prompt["instruction"]
    chosen = random.Random(_seed(item["question"], seed)).sample(prompt["demos"], min(shots, len(prompt["demos"])))
    demo_text = prompts.ALCE_DEMO_SEP.join(
        prompt["demo_prompt"].format(
            **demo, instruction=instruction, context=_render_docs(doc_prompt, demo["docs"], "ALCE prompt file")
        )
        for demo in chosen
    )
    if chosen:
        demo_text += prompts.ALCE_DEMO_SEP
    docs = item["docs"][: DOCS[hf.helmet_length(length)]]
    context = _render_docs(doc_prompt, docs, f"{task} item {item['question']!r}")
    user = partial(prompts.ALCE_USER.format, demo_text=demo_text, instruction=instruction, question=item["question"])
    if task == "alce_asqa":
        target = [list(pair["short_answers"]) for pair in item["qa_pairs"]]
    else:
        target = [list(aliases) for aliases in item["answers"]]
    # citations point into the item's documents as numbered in the prompt (all of them, as eval_alce.py reads)
    meta = {"question": item["question"], "docs": item["docs"]}
    return user, prompts.ANSWER_PREFIX, context, target, meta
