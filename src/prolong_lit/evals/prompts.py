"""HELMET's completion-style prompts (its `data.py`) and its context truncation.

Every prompt is `user_template + "\\n" + answer_prefix`: the model completes the answer prefix, which forces the
answer format even for a base model (HELMET runs recall/RAG/re-rank/ICL without a chat template). Only the
context (the JSON object, the passages, the demonstrations of ICL, the haystack) is ever cut; instructions, the
question and the few-shot demonstrations of the other tasks are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from transformers import PreTrainedTokenizerBase

# JSON KV (HELMET, after lost-in-the-middle's kv_retrieval prompt).
JSON_KV_USER = (
    "{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
    "{demos}Key: {question}"
)
JSON_KV_PREFIX = "Corresponding value:"
JSON_KV_DEMO = "Key: {key}\nCorresponding value: {value}"

# RULER needle-in-a-haystack (RULER's constants.py, as HELMET's load_ruler uses them).
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
RULER_SINGLE_USER = (
    "A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic {type_needle_v} for {query} "
    "mentioned in the provided text?"
)
RULER_SINGLE_PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text is"
RULER_MULTI_USER = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for "
    "{query} mentioned in the provided text?"
)
RULER_MULTI_PREFIX = "The special magic {type_needle_v} for {query} mentioned in the provided text are"

# RAG over KILT (NQ, TriviaQA, HotpotQA, PopQA).
RAG_USER = (
    "Use the given documents to write a concise and short answer to the question. Write your answer in the following "
    "format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}"
)
RAG_PREFIX = "Answer:"
RAG_PASSAGE = "Document (Title: {title}): {text}"
RAG_DEMO = "{documents}\n\nQuestion: {question}\nAnswer: {answer}"

# MS MARCO re-ranking (the typo "relelvant" is HELMET's, kept so prompts match).
RERANK_USER = (
    "You are provided with a list of documents, each indicated by their ID. Rank each document based on their "
    "relevance to the question in descending order from most relelvant to least relevant texts. Include all "
    "documents in the rankings. Write your answer using the unique IDs, with the following format:\nRanking: ID3 > "
    "ID1 > ID2\n\n{demos}{context}\n\nQuery: {question}"
)
RERANK_PREFIX = "Ranking:"
RERANK_PASSAGE_TITLED = "[ID: {id}] Document (Title: {title}): {text}"
RERANK_PASSAGE = "[ID: {id}] Document: {text}"

# ICL with integer-mapped labels.
ICL_USER = (
    'Use the provided mapping from the text to label to assign a label to the text. Only output "label: {{label}}" '
    "and nothing else. \n\n{context}\n\n{question}"
)
ICL_PREFIX = "label:"
ICL_ITEM = "{text}\nlabel: {label}"


def completion_prompt(user: str, answer_prefix: str) -> str:
    """HELMET's prompt without a chat template: the user text, a newline, then the answer prefix to complete."""
    return user + "\n" + answer_prefix


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The prompt's token ids as the model sees them (special tokens such as BOS included)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def json_kv_demos(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "\n\n".join(JSON_KV_DEMO.format(key=k, value=v) for k, v in pairs) + "\n\n"


def rag_passages(ctxs: Sequence[Mapping]) -> str:
    return "\n\n".join(RAG_PASSAGE.format(title=c["title"], text=c["text"]) for c in ctxs)


def rag_demos(demos: Sequence[Mapping]) -> str:
    if not demos:
        return ""
    blocks = [
        RAG_DEMO.format(documents=rag_passages(d["ctxs"]), question=d["question"], answer=d["answers"][0])
        for d in demos
    ]
    return "\n\n".join(blocks) + "\n\n"


def rerank_passages(ctxs: Sequence[Mapping]) -> str:
    """`[ID: x] Document (Title: T): text`, without the title part when the passages carry no title."""
    titled = bool(ctxs) and "title" in ctxs[0]
    template = RERANK_PASSAGE_TITLED if titled else RERANK_PASSAGE
    return "\n\n".join(template.format(id=c["id"], title=c.get("title", ""), text=c["text"]) for c in ctxs)


def gold_ranking(ctxs: Sequence[Mapping]) -> str:
    """The ids sorted by label, most relevant first (stable for ties), joined by ' > '."""
    return " > ".join(c["id"] for c in sorted(ctxs, key=lambda c: c["label"], reverse=True))


def rerank_demos(demos: Sequence[Mapping]) -> str:
    text = ""
    for demo in demos:
        text += rerank_passages(demo["ctxs"]) + f"\n\nQuery: {demo['query']}\nRanking: {gold_ranking(demo['ctxs'])}\n\n"
    return text


def icl_context(items: Sequence[tuple[str, str]]) -> str:
    return "\n\n".join(ICL_ITEM.format(text=text, label=label) for text, label in items)


def truncate_context(
    tokenizer: PreTrainedTokenizerBase,
    render: Callable[[str], str],
    context: str,
    budget: int,
    what: str,
) -> tuple[str, list[int], str]:
    """Cut `context` from its end until `render(context)` has at most `budget` tokens (HELMET's rule).

    The cut is made at the token offsets of the context, then the prompt is rendered and measured again (a cut can
    merge tokens at the seam, so this repeats until it fits). `what` names the task for the error raised when the
    instructions, demonstrations and question alone exceed the budget. Returns (prompt, input_ids, context).
    """
    prompt = render(context)
    ids = encode(tokenizer, prompt)
    while len(ids) > budget:
        if not context:
            raise ValueError(
                f"{what}: the prompt without any context already has {len(ids)} tokens, more than the budget of "
                f"{budget}; evaluate at a larger length"
            )
        excess = len(ids) - budget
        offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut = offsets[len(offsets) - excess][0] if excess < len(offsets) else 0
        context = context[: min(cut, len(context) - 1)]
        prompt = render(context)
        ids = encode(tokenizer, prompt)
    return prompt, ids, context
