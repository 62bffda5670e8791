"""Tiny files in the exact layouts and line formats of HELMET's LongQA, summarization and ALCE data.

LongQA / summarization rows are what `datasets`' `to_json` writes for the Hugging Face datasets HELMET loads
(nested `document`/`question`/`answers` for NarrativeQA, InfiniteBench's own jsonl fields, Multi-LexSum's
`sources` and `summary/short`); ALCE is a JSON array as in HELMET's tarball, and the prompt file has the keys of
HELMET's `prompts/*_revised.json`. Documents are long enough to pass HELMET's length filters (131,072 tokens for
NarrativeQA, 65,536 for the others) except the ones written short on purpose.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "river castle lantern orchard meadow harbor violin comet tunnel falcon garden window silver forest bridge "
    "candle market winter summer valley mountain letter friend doctor captain village station morning evening"
).split()


def long_text(rng: random.Random, words: int, tag: str) -> str:
    """A document of about `words` Llama-3 tokens (one common word ~ one token), starting with `tag`."""
    return tag + " " + " ".join(rng.choice(WORDS) for _ in range(words)) + ". The end of " + tag + "."


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_longdoc(data: Path, seed: int = 0) -> None:
    """narrativeqa/, infbench/ and multi_lexsum/ files under the HELMET `data` folder."""
    rng = random.Random(seed)
    story = [long_text(rng, 133_000, f"STORY{i}") for i in range(2)]
    short = long_text(rng, 500, "SHORTSTORY")
    test = []
    for d, doc in enumerate([*story, short]):
        for q in range(2):
            test.append(
                {
                    "document": {"id": f"doc{d}", "kind": "gutenberg", "text": doc},
                    "question": {"text": f"Who owns lantern {d}-{q}?", "tokens": []},
                    "answers": [{"text": f"captain {d}{q}", "tokens": []}, {"text": f"the captain {d}", "tokens": []}],
                }
            )
    _jsonl(data / "narrativeqa/test.jsonl", test)
    train = [
        {"question": {"text": f"Where is garden {i}?"}, "answers": [{"text": f"by river {i}"}, {"text": "x"}]}
        for i in range(6)
    ]
    _jsonl(data / "narrativeqa/train.jsonl", train)

    book = [long_text(rng, 66_000, f"BOOK{i}") for i in range(3)]
    qa = [
        {"id": i, "context": doc, "input": f"What did the falcon carry in book {i}?", "answer": [f"silver letter {i}"],
         "options": []}
        for i, doc in enumerate(book)
    ]
    qa.append({"id": 3, "context": "A tiny book.", "input": "Short?", "answer": ["yes"], "options": []})
    _jsonl(data / "infbench/longbook_qa_eng.jsonl", qa)
    choice = [
        {"id": i, "context": doc, "input": f"Which bridge in book {i}?", "answer": [f"bridge {i}b"],
         "options": [f"bridge {i}a", f"bridge {i}b", f"bridge {i}c", f"bridge {i}d"]}
        for i, doc in enumerate(book)
    ]
    _jsonl(data / "infbench/longbook_choice_eng.jsonl", choice)
    summaries = [
        {"id": i, "context": doc, "input": "", "answer": [f" The falcon crosses the valley in book {i}. "],
         "options": []}
        for i, doc in enumerate(book)
    ]
    _jsonl(data / "infbench/longbook_sum_eng.jsonl", summaries)

    cases = [long_text(rng, 33_500, f"CASE{i}") for i in range(4)]
    validation = [
        {"id": f"v{i}", "sources": [cases[2 * i], cases[2 * i + 1]], "summary/short": f"The court ruled {i}.",
         "summary/long": "long", "summary/tiny": None}
        for i in range(2)
    ]
    validation.append({"id": "v2", "sources": ["A short filing."], "summary/short": "Too short."})
    validation.append({"id": "v3", "sources": cases[:2], "summary/short": None})
    _jsonl(data / "multi_lexsum/validation.jsonl", validation)
    _jsonl(data / "multi_lexsum/train.jsonl", [{"id": f"t{i}", "summary/short": f"Settled case {i}."} for i in range(5)]
           + [{"id": "t9", "summary/short": None}])


ASQA_PROMPT = {
    "instruction": "Instruction: Write an accurate answer and cite documents as [x].",
    "demo_sep": "\n\n\n",
    "demo_prompt": "{instruction}\n\nQuestion: {question}\n\n{context}\n\nAnswer: {answer}",
    "doc_prompt": "Document [{ID}](Title: {title}): {text}",
    "demos": [
        {"question": f"Demo question {i}?", "answer": f"Demo answer {i} [1].",
         "docs": [{"title": f"Demo {i} title {j}", "text": f"demo {i} passage {j}"} for j in range(5)]}
        for i in range(4)
    ],
}
QAMPARI_PROMPT = {
    **ASQA_PROMPT,
    "instruction": "Instruction: Provide a list of accurate answers, separated by commas, each cited.",
    "demo_prompt": "{instruction}\n\nQuestion: {question}\n\n{context}\nAnswer: {answer}",
}


def _docs(rng: random.Random, n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}-{j}", "title": f"{tag} title {j}", "text": long_text(rng, 60, f"{tag}p{j}"),
             "score": 1.0 - j / n} for j in range(n)]


def write_alce(data: Path, prompts_dir: Path, seed: int = 0) -> None:
    """alce/{asqa,qampari}_eval_gtr_top2000.json under `data` and the two prompt files under `prompts_dir`."""
    rng = random.Random(seed)
    asqa = [
        {"sample_id": f"s{i}", "question": f"Who built tower {i}?", "answer": f"Builder {i}.",
         "qa_pairs": [{"question": "q", "short_answers": [f"mason {i}", f"m{i}"], "wikipage": None},
                      {"question": "q2", "short_answers": [f"architect {i}"], "wikipage": None}],
         "annotations": [{"long_answer": "a"}], "docs": _docs(rng, 40, f"asqa{i}")}
        for i in range(3)
    ]
    qampari = [
        {"id": f"q{i}", "question": f"Which rivers cross valley {i}?",
         "answers": [[f"river {i}a", f"the {i}a"], [f"river {i}b"], [f"river {i}c"]], "docs": _docs(rng, 40, f"qam{i}")}
        for i in range(3)
    ]
    (data / "alce").mkdir(parents=True, exist_ok=True)
    (data / "alce/asqa_eval_gtr_top2000.json").write_text(json.dumps(asqa, indent=1))
    (data / "alce/qampari_eval_gtr_top2000.json").write_text(json.dumps(qampari, indent=1))
    prompts_dir.mkdir(parents=True, exist_ok=True)
    (prompts_dir / "asqa_revised.json").write_text(json.dumps(ASQA_PROMPT, indent=1))
    (prompts_dir / "qampari_revised.json").write_text(json.dumps(QAMPARI_PROMPT, indent=1))
