"""ALCE citations: prompts from HELMET's file formats, citation recall/precision by hand, a local NLI model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from prolong_lit.errors import DataError
from prolong_lit.evals.helmet import build_helmet_example, load_helmet_task
from prolong_lit.evals.metrics import build_metric
from prolong_lit.evals.nli import NLIModel, citation_scores
from tests.helpers.helmet_data import ASQA_PROMPT, write_alce


def words_entail(premise: str, claim: str) -> bool:
    """A transparent judge for hand-computed cases: every word of the claim occurs in the premise."""
    words = lambda text: set(re.findall(r"[a-z0-9]+", text.lower()))  # noqa: E731
    return words(claim) <= words(premise)


DOCS = [{"title": "T1", "text": "which alpha beta"}, {"title": "T2", "text": "which gamma delta"}]


def test_citation_recall_and_precision_by_hand():
    output = "Alpha beta [1]. Gamma delta [1][2]. Nothing here. Gamma [3]."
    # 4 claims: 1 supported by [1]; 2 supported jointly, [1] unnecessary (overcite), [2] needed; 3 uncited;
    # 4 cites a document that does not exist. recall 2/4; precision: citations counted 1 + 2 = 3, needed 2.
    got = citation_scores(output, DOCS, "", qampari=False, entails=words_entail)
    assert got == {"citation_rec": pytest.approx(2 / 4), "citation_prec": pytest.approx(2 / 3)}
    # QAMPARI: each comma item is a claim "question item"
    got = citation_scores("alpha [1], gamma [2], zeta.", DOCS, "Which", qampari=True, entails=words_entail)
    assert got == {"citation_rec": pytest.approx(2 / 3), "citation_prec": pytest.approx(1.0)}
    assert citation_scores("ok.", DOCS, "", qampari=False, entails=words_entail) is None  # no sentence >= 5 chars


def test_alce_metric_reports_citations_only_with_a_judge():
    metric = build_metric("str_em", "Answer:", nli=words_entail, sync_on_compute=False)
    target = [["alpha"], ["omega"]]
    details = metric.details("Alpha beta [1]. Gamma delta [2].", target, {"docs": DOCS, "question": "q"})
    assert details["str_em"] == 0.5 and details["str_hit"] == 0.0
    assert details["citation_rec"] == 1.0 and details["citation_prec"] == 1.0
    assert metric.score_one("Alpha beta [1].", target) == 0.5
    without = build_metric("str_em", "Answer:", sync_on_compute=False)
    assert without.details("Alpha [1].", target, {"docs": DOCS})["citation_rec"] is None


@pytest.fixture(scope="module")
def alce_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("helmet")
    write_alce(root / "data", root / "prompts")  # a HELMET checkout: prompts/ beside data/
    return root


def _docs_prompt(docs):
    return "\n\n".join(f"Document [{i + 1}](Title: {d['title']}): {d['text']}" for i, d in enumerate(docs))


def test_alce_prompt_sampling_and_document_count(alce_dir, llama3_tokenizer):
    items = json.loads((alce_dir / "data/alce/asqa_eval_gtr_top2000.json").read_text())
    data = load_helmet_task("alce_asqa", alce_dir, 8192, samples=2, seed=42)
    order = np.random.default_rng(42).permutation(len(items))[:2]  # datasets' shuffle(seed)
    assert [r["sample_id"] for r in data.records] == [items[i]["sample_id"] for i in order]
    example = build_helmet_example(data, 0, llama3_tokenizer, budget=8192 - 300)
    item, prompt = data.records[0], example.prompt
    head, body = prompt.split(ASQA_PROMPT["instruction"] + "\n\nQuestion: " + item["question"] + "\n\n")
    demos = head.split("\n\n\n")[:-1]
    assert len(demos) == 2 and head.endswith("\n\n\n")
    for demo in demos:  # each demonstration: instruction, question, its 5 documents, its answer
        question = re.search(r"Question: (Demo question \d\?)", demo)[1]
        source = next(d for d in ASQA_PROMPT["demos"] if d["question"] == question)
        assert demo == (f"{ASQA_PROMPT['instruction']}\n\nQuestion: {question}\n\n{_docs_prompt(source['docs'])}"
                        f"\n\nAnswer: {source['answer']}")
    assert body == _docs_prompt(item["docs"][:30]) + "\n\nAnswer:"  # 8K shows 30 of the 40 passages
    assert example.target == [qa["short_answers"] for qa in item["qa_pairs"]]
    assert example.meta["docs"] == item["docs"] and len(example.input_ids) <= 8192 - 300
    small = build_helmet_example(load_helmet_task("alce_asqa", alce_dir, 4096, 2, 42), 0, llama3_tokenizer, 3796)
    assert "Document [8](" in small.prompt and "Document [9](" not in small.prompt  # 4K: 8 passages


def test_alce_bad_files_name_file_and_item(tmp_path):
    write_alce(tmp_path / "data", tmp_path / "data/prompts")  # prompts/ copied into the data folder also works
    load_helmet_task("alce_qampari", tmp_path, 8192, 1, 0)
    path = tmp_path / "data/alce/qampari_eval_gtr_top2000.json"
    items = json.loads(path.read_text())
    items[1]["answers"] = ["river"]
    path.write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"qampari_eval_gtr_top2000.json: item 1: field 'answers'"):
        load_helmet_task("alce_qampari", tmp_path, 8192, 1, 0)
    path.write_bytes(b'[\n{"question": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"qampari_eval_gtr_top2000.json:2: not UTF-8"):
        load_helmet_task("alce_qampari", tmp_path, 8192, 1, 0)


def _tiny_t5(path, tokenizer, forced: int | None):
    """A real (random) T5 saved with a tokenizer; with `forced` its first generated token is forced, then EOS."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tokenizer), d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy picks id 0, which is EOS here
    if forced is not None:
        model.generation_config.forced_bos_token_id = forced
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_nli_model_reads_a_local_directory_and_answers_by_the_decoded_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "<pad>": 1, "1": 2, "0": 3, "<unk>": 4, "premise:": 5, "hypothesis:": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    _tiny_t5(tmp_path / "yes", tokenizer, forced=2)
    _tiny_t5(tmp_path / "no", tokenizer, forced=None)
    yes, no = NLIModel(tmp_path / "yes", device="cpu"), NLIModel(tmp_path / "no", device="cpu")
    assert yes("Title: T\nsome passage", "a claim") is True
    assert no("Title: T\nsome passage", "a claim") is False
    metric = build_metric("str_em", "Answer:", nli=yes, sync_on_compute=False)
    details = metric.details("Alpha beta [1]. Gamma [2][1].", [["alpha"]], {"docs": DOCS, "question": "q"})
    assert details["citation_rec"] == 1.0 and details["citation_prec"] == 1.0
    with pytest.raises(ValueError, match="nli_model_dir"):
        NLIModel(tmp_path / "missing")
