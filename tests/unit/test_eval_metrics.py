"""Metrics and answer normalisation against hand-computed values; torchmetrics state sync over 2 gloo ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from prolong_lit.evals.metrics import (
    NDCG,
    Accuracy,
    ExactMatch,
    RulerRecall,
    SubstringExactMatch,
    TokenF1,
    build_metric,
    ndcg_at_k,
    token_f1,
)
from prolong_lit.evals.normalize import normalize_answer, parse_output, parse_rankings
from tests.helpers.ports import free_port


def test_normalize_answer_lowercases_drops_punctuation_articles_and_spaces():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day\tkeeps THE doctor away.") == "apple day keeps doctor away"
    assert normalize_answer("3f2a-1B9c") == "3f2a1b9c"  # UUID hyphens go with the punctuation
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_parse_output_takes_text_after_a_repeated_prefix_else_the_first_line():
    assert parse_output(" Paris\nQuestion: next", "Answer:") == "Paris"
    assert parse_output("Answer: Paris\nmore", "Answer:") == "Paris"
    assert parse_output("answer: answer: Rome", "Answer:") == "Rome"  # repeated prefix stripped, any case
    assert parse_output(" 3\nlabel: 4", "label:") == "4"  # HELMET: a later "label:" line wins
    assert parse_output("", "Answer:") == ""


def test_exact_and_substring_match_take_the_best_of_raw_and_parsed_and_of_the_golds():
    em = ExactMatch(answer_prefix="Answer:")
    # raw " Paris\nQuestion: ..." is not an exact match, its parsed first line is
    em.update([" Paris\nQuestion: Who?", "Lyon", "the Paris."], [["paris"], ["Paris", "Lyon"], ["Paris"]])
    assert em.compute().item() == pytest.approx(1.0)
    sub = SubstringExactMatch(answer_prefix="Corresponding value:")
    sub.update(["It is a3-f9.", "b"], [["A3F9"], ["bb"]])  # 'a3f9' in 'it is a3f9'; 'bb' not in 'b'
    assert sub.compute().item() == pytest.approx(0.5)


def test_token_f1_hand_computed():
    # normalized: "cat sat on mat" vs "cat on mat": 3 common tokens, P = 3/4, R = 3/3
    assert token_f1("The cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert token_f1("yes it is", "yes") == 0.0  # yes/no answers must match exactly
    assert token_f1("dog", "cat") == 0.0
    f1 = TokenF1(answer_prefix="Answer:")
    f1.update(["The cat sat on the mat", "dog"], [["a cat on a mat", "mat"], ["cat"]])
    assert f1.compute().item() == pytest.approx((2 * 0.75 / 1.75 + 0.0) / 2)


def test_ruler_recall_is_the_fraction_of_gold_values_found_case_insensitively():
    recall = RulerRecall()
    recall.update(["are 123, 456 and 7", "The uuid is ABC-def"], [["123", "456", "789"], ["abc-DEF"]])
    assert recall.compute().item() == pytest.approx((2 / 3 + 1.0) / 2)


def test_accuracy_scores_the_parsed_label_only():
    acc = Accuracy(answer_prefix="label:")
    # " 3\n" parses to "3"; "The label is 3" parses to itself (no raw-output fallback, unlike substring EM)
    acc.update([" 3\n", "The label is 3", " 12"], [["3"], ["3"], ["1"]])
    assert acc.compute().item() == pytest.approx(1 / 3)


def test_parse_rankings_scores_parsed_ids_n_minus_rank():
    assert parse_rankings("[ID: 3] > [ID: 1] > 2 and more") == {"3": 3, "1": 2, "2": 1}
    assert parse_rankings("ID7 > ID7 > ID2") == {"7": 3, "2": 1}  # a repeat keeps its first rank
    assert parse_rankings("1 > 2\nlonger: 5 > 6 > 9") == {"5": 3, "6": 2, "9": 1}  # longest run wins
    assert parse_rankings("no idea") == {"no ea": 1}  # no integer: the whole (cleaned) text, matching nothing


def test_ndcg_hand_computed():
    qrels = {"1": 3, "2": 2, "3": 0, "4": 1}
    # ranking 2, 1, 4, 3: DCG = 2/log2(2) + 3/log2(3) + 1/log2(4) + 0/log2(5); ideal order 3, 2, 1
    dcg = 2 / 1 + 3 / math.log2(3) + 1 / 2
    idcg = 3 / 1 + 2 / math.log2(3) + 1 / 2
    metric = NDCG(k=10)
    assert metric.score_one("ID2 > ID1 > ID4 > ID3", qrels) == pytest.approx(dcg / idcg)
    assert metric.score_one("1 > 2 > 4 > 3", qrels) == pytest.approx(1.0)
    assert metric.score_one("I cannot rank these", qrels) == 0.0
    # only the top 10 count: a relevant document at rank 11 adds nothing
    ranking = " > ".join(str(i) for i in range(100, 110)) + " > 1"
    assert metric.score_one(ranking, qrels) == 0.0
    # an id outside the qrels has gain 0; a query with no relevant document scores 0
    assert ndcg_at_k({"9": 2, "1": 1}, {"1": 1}) == pytest.approx((1 / math.log2(3)) / 1.0)
    assert ndcg_at_k({"1": 1}, {"1": 0}) == 0.0
    metric.update(["ID2 > ID1 > ID4 > ID3", "1 > 2 > 4 > 3"], [qrels, qrels])
    assert metric.compute().item() == pytest.approx((dcg / idcg + 1.0) / 2)


def test_metric_states_reduce_by_sum_and_empty_metric_is_nan():
    metric = build_metric("substring_exact_match", "Answer:")
    assert metric._reductions["score_sum"].__name__ == "dim_zero_sum"
    assert metric._reductions["count"].__name__ == "dim_zero_sum"
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(build_metric("exact_match", "Answer:").compute().item())
    with pytest.raises(ValueError, match="unknown metric"):
        build_metric("bleu", "Answer:")
    with pytest.raises(ValueError, match="2 outputs but 1 targets"):
        metric.update(["a", "b"], [["a"]])


def _sync_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metric = SubstringExactMatch(answer_prefix="Answer:")
        # rank 0 sees 3 examples (2 right), rank 1 sees 1 (right): the global mean is 3/4, not (2/3 + 1) / 2
        if rank == 0:
            metric.update(["paris", "rome", "x"], [["Paris"], ["Rome"], ["y"]])
        else:
            metric.update(["oslo"], [["Oslo"]])
        queue.put((rank, metric.compute().item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_metric_compute_is_the_mean_over_all_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_sync_worker, args=(free_port(), queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert results == {0: pytest.approx(0.75), 1: pytest.approx(0.75)}


# ---- LongQA, summarization and ALCE metrics ------------------------------------------------------------------


def test_rouge_l_and_lsum_against_hand_computed_lcs_and_rouge_score_itself():
    from rouge_score import rouge_scorer

    from prolong_lit.evals.metrics import rouge_scores

    # one sentence: LCS "the cat on the mat" = 5 of 6 tokens each side -> P = R = F = 5/6
    assert rouge_scores("the cat sat on the mat", "the cat is on the mat")["rougeL_f1"] == pytest.approx(5 / 6)
    # two lines swapped: ROUGE-L sees one sequence (LCS 4 of 7 stemmed tokens), ROUGE-Lsum the union LCS per line
    gold, pred = "The cats are running.\nDogs bark loudly.", "Dogs bark loudly.\nThe cats are running."
    scores = rouge_scores(pred, gold)
    assert scores["rougeL_f1"] == pytest.approx(4 / 7) and scores["rougeLsum_f1"] == pytest.approx(1.0)
    reference = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    for p, g in [(pred, gold), ("A summary of a trial.\nThe judge ruled.", "The court ruled for the plaintiffs.")]:
        direct = reference.score(target=g, prediction=p)
        got = rouge_scores(p, g)
        for kind in ("rougeL", "rougeLsum"):
            assert got[f"{kind}_f1"] == pytest.approx(direct[kind].fmeasure, abs=1e-12)
            assert got[f"{kind}_recall"] == pytest.approx(direct[kind].recall, abs=1e-12)


def test_text_metrics_take_the_best_of_answers_and_of_raw_vs_parsed_output():
    from prolong_lit.evals.metrics import best_text_metrics, text_metrics

    raw = "Answer: the captain\nQuestion: who else?"
    plain = text_metrics(raw, ["The Captain", "nobody"])
    assert plain["exact_match"] == 0.0 and plain["substring_exact_match"] == 1.0
    assert plain["f1"] == pytest.approx(2 * (1 / 5) * 1 / (1 / 5 + 1))  # "answer captain question who else"
    best = best_text_metrics(raw, ["The Captain", "nobody"], "Answer:")
    assert best["exact_match"] == 1.0 and best["f1"] == 1.0 and best["rougeL_f1"] == 1.0  # parsed: "the captain"
    metric = build_metric("rougeL_f1", "Answer:", sync_on_compute=False)
    metric.update([raw, "nothing"], [["the captain"], ["the captain"]])
    assert float(metric.compute()) == pytest.approx(0.5)
    assert set(metric.details(raw, ["the captain"])) == {
        "exact_match", "f1", "substring_exact_match", "rougeL_f1", "rougeL_recall", "rougeLsum_f1", "rougeLsum_recall"
    }


def test_choice_accuracy_letter_or_lettered_option_text():
    from prolong_lit.evals.metrics import choice_accuracy

    gold = ["B", "B. bridge 2b"]
    assert choice_accuracy("B", gold) == 1.0
    assert choice_accuracy("Answer: B\n", gold) == 1.0  # the parsed output
    assert choice_accuracy("I think it is b. Bridge 2B, clearly", gold) == 1.0  # "B. bridge 2b" in the output
    assert choice_accuracy("C", gold) == 0.0
    assert choice_accuracy("B is wrong, C", gold) == 0.0  # no exact match, no lettered option text


def test_alce_str_em_and_qampari_scores_by_hand():
    from prolong_lit.evals.metrics import qampari_scores, remove_citations, str_em

    assert remove_citations("A [1][2] b [3].") == "A b."
    pairs = [["mason 1", "m1"], ["architect 1"]]
    assert str_em("It was Mason 1 [1]\nwith the architect [2].", pairs) == (0.5, 0.0)
    assert str_em("Mason 1 [1] and the Architect 1 [2].", pairs) == (1.0, 1.0)
    answers = [["river 1a", "the 1a"], ["river 1b"], ["river 1c"]]
    got = qampari_scores("River 1a [1], river 1b [2], lake [3].", answers)
    assert got["num_preds"] == 3 and got["qampari_prec"] == pytest.approx(2 / 3)
    assert got["qampari_rec"] == pytest.approx(2 / 3) and got["qampari_rec_top5"] == pytest.approx(2 / 3)
    assert got["qampari_f1"] == pytest.approx(2 / 3)
    many = [[f"x{i}"] for i in range(8)]  # rec@5: 5 of 8 found counts as complete
    assert qampari_scores("x0, x1, x2, x3, x4", many)["qampari_rec_top5"] == 1.0
    assert qampari_scores("x0, x1, x2, x3, x4", many)["qampari_rec"] == pytest.approx(5 / 8)
    metric = build_metric("qampari_rec_top5", "Answer:", sync_on_compute=False)
    assert metric.score_one("River 1a [1], river 1b [2], lake [3].", answers) == pytest.approx(2 / 3)
    details = metric.details("river 1a [1]", answers, {"docs": [], "question": "q"})
    assert details["citation_rec"] is None and details["citation_prec"] is None  # no NLI model: not computed


def test_offline_notes_name_the_judge_and_the_missing_citation_scores():
    from prolong_lit.evals.metrics import offline_notes

    notes = offline_notes(
        {"narrativeqa": "rougeL_f1", "kilt_nq": "substring_exact_match", "alce_asqa": "str_em"},
        {"alce_asqa": {"citation_rec": {1024: None}}, "narrativeqa": {"f1": {1024: 3.0}}},
    )
    assert notes == [
        "narrativeqa: HELMET's GPT-4o judge (gpt-4-score) cannot run offline; the score is rougeL_f1",
        "alce_asqa: citation recall/precision not computed (no NLI model; set nli_model_dir)",
    ]
