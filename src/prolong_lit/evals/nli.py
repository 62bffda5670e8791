"""Citation recall and precision of ALCE outputs, judged by a local NLI model (HELMET's `eval_alce.py` AutoAIS).

HELMET judges entailment with `google/t5_xxl_true_nli_mixture`: the input is `premise: {passages} hypothesis:
{claim}`, the model generates up to 10 tokens and the claim is supported when the decoded text is exactly "1".
`NLIModel` does the same with any local sequence-to-sequence model directory (`EvalSettings.nli_model_dir`); it is
never downloaded. Without one, citation recall/precision are reported as not computed.

`citation_scores` is the scoring itself, for one output:
- claims: ASQA splits the output into sentences and drops those under 5 characters; QAMPARI's claims are
  "question + item" for each comma-separated item;
- a claim's citations are its `[n]` markers (1-based); none, or one past the documents, makes it unsupported;
  at most the first 3 are used; the claim (citations removed) is judged against the cited documents joined
  (`Title: t\\ntext` each, newline-separated);
- recall = supported claims / claims;
- precision counts, over all citations, those that are needed: with a single citation, the claim's support; with
  several, a citation counts unless the claim is not entailed by its document alone but is by the others.

Sentences are split by NLTK's Punkt (HELMET's `sent_tokenize`) with its English model when NLTK's data is
installed, else with an untrained Punkt splitter (nothing is downloaded at run time).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from prolong_lit.errors import ConfigError
from prolong_lit.evals.metrics import alce_output, remove_citations

Entails = Callable[[str, str], bool]
AT_MOST_CITATIONS = 3


def split_sentences(text: str) -> list[str]:
    """Punkt sentences: NLTK's English model if present, else an untrained Punkt splitter (offline)."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        return nltk.sent_tokenize(text)
    except LookupError:  # the punkt data is not installed and must not be downloaded here
        return PunktSentenceTokenizer().tokenize(text)


def _doc_text(doc: Mapping) -> str:
    return f"Title: {doc['title']}\n{doc['sent'] if 'sent' in doc else doc['text']}"


def _claims(output: str, question: str, qampari: bool) -> list[str]:
    if qampari:
        items = output.rstrip().rstrip(".").rstrip(",").split(",")
        return [f"{question} {item.strip()}" for item in items]
    return [s for s in split_sentences(output) if len(s.strip()) >= 5]


def _precision_hits(ref: list[int], docs: Sequence[Mapping], claim: str, entails: Entails) -> int:
    """Of a supported claim's several citations, those that are needed (HELMET's conditions A and B)."""
    hits = 0
    for doc_id in ref:
        if entails(_doc_text(docs[doc_id]), claim):
            hits += 1
            continue
        others = [i for i in ref if i != doc_id]  # HELMET removes the first occurrence only; ids differ here
        if not entails("\n".join(_doc_text(docs[i]) for i in others), claim):
            hits += 1
    return hits


def citation_scores(
    output: str, docs: Sequence[Mapping], question: str, qampari: bool, entails: Entails
) -> dict[str, float] | None:
    """{"citation_rec", "citation_prec"} (fractions) of one output; None when it has no claim (left out of the
    means, as eval_alce.py skips it)."""
    claims = _claims(alce_output(output), question, qampari)
    if not claims:
        return None
    supported, needed, total_citations = 0, 0, 0
    for claim in claims:
        target = remove_citations(claim).strip()
        ref = [int(r[1:]) - 1 for r in re.findall(r"\[\d+", claim)]
        if not ref or any(r >= len(docs) for r in ref):
            continue  # uncited or cites a document that is not there: unsupported, no citation counted
        ref = ref[:AT_MOST_CITATIONS]
        total_citations += len(ref)
        joint = entails("\n".join(_doc_text(docs[r]) for r in ref), target)
        supported += int(joint)
        if joint and len(ref) > 1:
            needed += _precision_hits(ref, docs, target, entails)
        else:
            needed += int(joint)
    return {
        "citation_rec": supported / len(claims),
        "citation_prec": needed / total_citations if total_citations else 0.0,
    }


class NLIModel:
    """A local sequence-to-sequence NLI model (HELMET: t5_xxl_true_nli_mixture) as a (premise, claim) -> bool judge."""

    def __init__(self, model_dir: str | Path, device=None):
        """
        Args:
            model_dir: a Hugging Face model directory holding the model and its tokenizer (read offline).
            device: where to run it (None: CUDA if available, else CPU).
        """
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"nli_model_dir: {path} is not a Hugging Face model directory (no config.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()

    def __call__(self, premise: str, claim: str) -> bool:
        import torch

        ids = self.tokenizer(f"premise: {premise} hypothesis: {claim}", return_tensors="pt").input_ids
        with torch.inference_mode():  # inputs are not cut, as in HELMET (T5's relative positions take any length)
            out = self.model.generate(ids.to(self.device), max_new_tokens=10, do_sample=False)
        return self.tokenizer.decode(out[0], skip_special_tokens=True) == "1"
