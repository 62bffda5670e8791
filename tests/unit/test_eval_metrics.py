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
