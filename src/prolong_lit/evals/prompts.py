"""HELMET's prompts (its `data.py`), with or without the tokenizer's chat template, and its context truncation.

Without a chat template a prompt is `user_template + sep + answer_prefix` (sep is "\\n", or "\\n\\n" for
InfBench, Multi-LexSum and ALCE): the model completes the answer prefix, which forces the answer format even for a
base model (HELMET runs recall/RAG/re-rank/ICL/RULER this way by default). With a chat template (`render_prompt(...,
chat=True)`, HELMET's `use_chat_template`) the user turn is `user_template` alone, there is no system message
(HELMET's default), the template's generation prompt opens the assistant turn, and the rendered text is encoded
without adding special tokens again (the template writes BOS itself).

Only the context (the JSON object, the passages, the document, the demonstrations of ICL, the haystack) is ever
cut; instructions, the question and the few-shot demonstrations of the other tasks are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from prolong_lit.errors import ConfigError

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

# Long-document QA (NarrativeQA, InfiniteBench) and summarization (InfiniteBench, Multi-LexSum): HELMET's wording.
NARRATIVEQA_USER = (
    "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as "
    "concisely as you can, using a single phrase if possible.\n\n{demo}{context}\n\nQuestion: {question}"
)
NARRATIVEQA_DEMOS = "For example:\n\n{demos}\n\nNow, use the following story to answer the question:\n\n"
QA_DEMO = "Question: {question}\nAnswer: {answer}"
INFBENCH_QA_USER = (
    "You are given a story and a question. Answer the question as concisely as you can, using a single phrase if "
    "possible.\n\n{demo}{context}\n\nQuestion: {question}"
)
INFBENCH_CHOICE_USER = (
    "You are given a story and a question with multiple choices. Choose the best answer from the options provided. "
    "Only one of the following options is correct, output the answer using one single letter (A, B, C, or D). "
    "Don't say anything else.\n\n{demo}{context}\n\nQuestion: {question}\nOptions:\n{options}"
)
INFBENCH_SUM_USER = (
    "You are given a book and you are tasked to summarize it. Write a summary of about 1000 to 1200 words. Only "
    "write about the plot and characters of the story. Do not discuss the themes or background of the book. Do not "
    "provide any analysis or commentary.\n\n{demo}{context}\n\nNow summarize the book."
)
INFBENCH_DEMOS = "For example:\n\n{demos}\n\nNow, read the following story:\n\n"
INFBENCH_QA_DEMO = "[story text]\nQuestion: {question}\nAnswer: {answer}"
INFBENCH_CHOICE_DEMO = "[story text]\nQuestion: {question}\nOptions:\n{options}\nAnswer: {answer}"
INFBENCH_SUM_DEMO = "[story text]\nSummary: {answer}"
CHOICE_OPTIONS = "A. {}\nB. {}\nC. {}\nD. {}"
MULTI_LEXSUM_USER = (
    "You are given the legal documents in a civil rights lawsuit, and you are tasked to summarize the case. Write a "
    "concise summary of one paragraph (200 to 250 words). The summary should contain a short description of the "
    "background, the parties involved, and the outcomes of the case.\n\n{demo}Legal documents:\n{context}\n\n"
    "Now please summarize the case."
)
MULTI_LEXSUM_DEMOS = "Example summaries:\n\n{demos}\n\nNow, write a summary of the following legal documents.\n"
SUMMARY_DEMO = "Summary: {answer}"
SUMMARY_PREFIX = "Summary:"
ANSWER_PREFIX = "Answer:"
# What HELMET appends to a document it shortened to the length of the dataset's name (its `truncate_llama2`).
OMITTED = " ... [the rest of the text is omitted]"

# ALCE (citations): instruction, demo and document formats come from HELMET's prompt file; this is the frame.
ALCE_USER = "{demo_text}{instruction}\n\nQuestion: {question}\n\n{context}"
ALCE_DEMO_SEP = "\n\n\n"


def completion_prompt(user: str, answer_prefix: str, sep: str = "\n") -> str:
    """HELMET's prompt without a chat template: the user text, `sep`, then the answer prefix to complete."""
    return user + sep + answer_prefix


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, user: str, answer_prefix: str, chat: bool, sep: str = "\n"
) -> str:
    """The prompt text: the completion prompt, or with `chat` the user turn in the tokenizer's chat template with
    the assistant turn opened (no system message, as HELMET's default)."""
    if not chat:
        return completion_prompt(user, answer_prefix, sep)
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool = False) -> list[int]:
    """The prompt's token ids as the model sees them: BOS added to a completion prompt; a chat-rendered prompt
    already holds it, so nothing is added."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


@dataclass(frozen=True)
class PromptFormat:
    """How a task's text becomes the model's prompt: HELMET's completion prompt, or with `chat` the tokenizer's chat
    template (`render_prompt`), and the ids the model sees (`encode`). Builders take one so that the same code
    fits a haystack to the budget in either format."""

    tokenizer: PreTrainedTokenizerBase
    chat: bool = False

    def render(self, user: str, answer_prefix: str, sep: str = "\n") -> str:
        return render_prompt(self.tokenizer, user, answer_prefix, self.chat, sep)

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, self.chat)


def cut_document(tokenizer: PreTrainedTokenizerBase, context: str, max_tokens: int) -> str:
    """HELMET's first cut of a long document (LongQA, summarization): a document over `max_tokens` tokens keeps its
    first `max_tokens - len(OMITTED)` tokens followed by `OMITTED`, about `max_tokens` tokens in all.

    HELMET measures this with the Llama-2 tokenizer; here it is the evaluation's tokenizer (lengths are counted
    in it everywhere in this package)."""
    def offsets_of(text: str) -> list:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    # Tokenize a generous prefix first (about 8 characters per needed token): the tokens well before its end are
    # those of the whole text, so a document far over the limit is never tokenized whole.
    head = context[: 8 * (max_tokens + 2)]
    offsets = offsets_of(head)
    if len(offsets) <= max_tokens + 1 and len(head) < len(context):
        offsets = offsets_of(context)
    if len(offsets) <= max_tokens:  # exact here: a prefix with this few tokens was replaced by the whole text
        return context
    keep = max(max_tokens - len(tokenizer(OMITTED, add_special_tokens=False)["input_ids"]), 0)
    return context[: offsets[keep - 1][1]] + OMITTED if keep else OMITTED


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
    chat: bool = False,
) -> tuple[str, list[int], str]:
    """Cut `context` from its end until `render(context)` has at most `budget` tokens (HELMET's rule).

    The cut is made at the token offsets of the context, then the prompt is rendered and measured again (a cut can
    merge tokens at the seam, so this repeats until it fits). `what` names the task for the error raised when the
    instructions, demonstrations and question alone exceed the budget; `chat` says `render` gives a chat-rendered
    prompt (encoded without adding BOS again). Returns (prompt, input_ids, context).
    """
    prompt = render(context)
    ids = encode(tokenizer, prompt, chat)
    while len(ids) > budget:
        if not context:
            raise ConfigError(
                f"{what}: the prompt without any context already has {len(ids)} tokens, more than the budget of "
                f"{budget}; evaluate at a larger length"
            )
        excess = len(ids) - budget
        offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cut = offsets[len(offsets) - excess][0] if excess < len(offsets) else 0
        context = context[: min(cut, len(context) - 1)]
        prompt = render(context)
        ids = encode(tokenizer, prompt, chat)
    return prompt, ids, context
