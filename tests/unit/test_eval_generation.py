"""Greedy generation, loss by position and run_evaluation on a tiny random Llama (fp32) with the real tokenizer."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from prolong_lit.evals import (
    EvalResults,
    EvalSettings,
    figure_to_array,
    make_figures,
    run_evaluation,
    write_report,
)
from prolong_lit.evals.generation import greedy_generate, newline_token_ids, stop_token_ids
from prolong_lit.evals.metrics import build_metric
from prolong_lit.evals.position_loss import bucket_edges, loss_by_position
from prolong_lit.evals.registry import TASKS
from tests.helpers.ports import free_port

NEWLINE, EOT = 198, 128009  # Llama-3's "\n" and <|eot_id|>


def tiny_llama(attn_implementation: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        use_cache=False,  # as the training config
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).eval()


def _prompts(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_cached_decoding_equals_cache_free_and_hf_generate(attn):
    model = tiny_llama(attn)
    prompts = _prompts([5, 23, 2])
    cached, cached_stats = greedy_generate(model, prompts, 6, [EOT], pad_token_id=128004, batch_size=3)
    free, free_stats = greedy_generate(model, prompts, 6, [EOT], pad_token_id=128004, use_cache=False)
    assert cached == free  # token for token: left padding and the cache change nothing
    assert all(len(ids) == 6 for ids in cached)  # a random model never hits <|eot_id|> here
    for prompt, ids in zip(prompts, cached):  # independent reference: transformers' own greedy search
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert ref[0, len(prompt) :].tolist() == ids
    # cache: 1 batch x 6 steps, one forward each; no cache: 3 prompts x 6 full-sequence forwards
    assert cached_stats.forward_calls == 6 and free_stats.forward_calls == 18
    assert cached_stats.generated_tokens == free_stats.generated_tokens == 18
    assert cached_stats.prompt_tokens == sum(map(len, prompts))


def test_generation_stops_at_newline_and_at_eos(llama3_tokenizer):
    newline_ids = newline_token_ids(llama3_tokenizer)
    assert {
        NEWLINE,
        llama3_tokenizer.convert_tokens_to_ids("ĊĊ"),
        llama3_tokenizer.convert_tokens_to_ids(".Ċ"),
    } <= newline_ids
    assert llama3_tokenizer.convert_tokens_to_ids("Ġthe") not in newline_ids
    prompt = _prompts([12])
    free_run, _ = greedy_generate(tiny_llama(), prompt, 8, [], pad_token_id=128004)
    for stop_token, stop_newline in ((NEWLINE, True), (EOT, False)):
        model = tiny_llama()
        with torch.no_grad():  # make the stop token outscore what the model says at step 2
            model.lm_head.weight[stop_token] = 1.5 * model.lm_head.weight[free_run[0][2]]
        stops = stop_token_ids(llama3_tokenizer, stop_newline=stop_newline)
        (ids,), _ = greedy_generate(model, prompt, 8, stops, pad_token_id=128004)
        assert ids[-1] == stop_token and len(ids) <= 3 and ids[:-1] == free_run[0][: len(ids) - 1]
        text = llama3_tokenizer.decode(ids, skip_special_tokens=True)
        assert text.endswith("\n") if stop_token == NEWLINE else "<|eot_id|>" not in text
    # without newline stopping the newline-loving model runs on to max_new_tokens
    (ids,), _ = greedy_generate(model, prompt, 8, stop_token_ids(llama3_tokenizer, False) - {EOT}, 128004)
    assert len(ids) == 8


def test_loss_by_position_matches_full_logits_cross_entropy():
    model = tiny_llama()
    docs = [torch.tensor(p) for p in _prompts([100, 37], seed=3)]
    got = loss_by_position(model, docs, scheme="pow2", chunk_size=16)
    edges = bucket_edges(100, "pow2")
    assert edges == [1, 2, 4, 8, 16, 32, 64, 128]
    sums, counts = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1)
    with torch.no_grad():
        for doc in docs:
            logits = model(doc[None]).logits[0].float()  # (L, V): the reference materialises everything
            nll = F.cross_entropy(logits[:-1], doc[1:], reduction="none")
            for p, value in zip(range(1, doc.numel()), nll.tolist()):
                b = max(i for i, e in enumerate(edges[:-1]) if e <= p)
                sums[b] += value
                counts[b] += 1
    expected = {f"{lo}-{hi}": s / c for lo, hi, s, c in zip(edges, edges[1:], sums, counts)}
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    # the varlen kwargs (for a registered FlashAttention path) are ignored by sdpa: same numbers
    assert loss_by_position(model, docs, varlen=True, chunk_size=16) == pytest.approx(got)
    linear = loss_by_position(model, docs, scheme="linear", num_buckets=4)
    assert list(linear) == ["1-26", "26-51", "51-76", "76-100"]
    all_mean = sum(sums) / sum(counts)
    weights = [
        sum(1 for d in docs for p in range(1, d.numel()) if lo <= p < hi)
        for lo, hi in zip([1, 26, 51, 76], [26, 51, 76, 100])
    ]
    assert sum(w * v for w, v in zip(weights, linear.values())) / sum(weights) == pytest.approx(all_mean, rel=1e-5)


def test_run_evaluation_end_to_end_with_report(llama3_tokenizer, tmp_path):
    model = tiny_llama()
    model.train()
    settings = EvalSettings(
        tasks=["json_kv", "ruler_niah_mk_2"], lengths=[256, 384], depths=[0.0, 1.0], samples_per_task=2, seed=0,
        batch_size=2, max_new_tokens=3,
    )
    results = run_evaluation(model, llama3_tokenizer, settings, max_position_embeddings=4096)
    assert model.training  # mode restored
    flat = results.flat()
    assert set(flat) == {
        "eval/json_kv@256",
        "eval/json_kv@384",
        "eval/ruler_niah_mk_2@256",
        "eval/ruler_niah_mk_2@384",
    }  # no category: HELMET's recall also needs ruler_niah_mk_3 and ruler_niah_mv
    assert results.incomplete_categories["recall"] == ["ruler_niah_mk_3", "ruler_niah_mv"]
    assert all(0.0 <= v <= 100.0 for v in flat.values())
    assert results.num_examples == {"json_kv": {256: 2, 384: 2}, "ruler_niah_mk_2": {256: 2, 384: 2}}
    assert {d for by_len in results.depth_scores["json_kv"].values() for d in by_len} == {0.0, 1.0}
    assert len(results.records) == 8 and results.generation["sequences"] == 8
    for task, by_length in results.scores.items():  # task@length score = mean of the per-example scores
        for length, score in by_length.items():
            rec = [r for r in results.records if r["task"] == task and r["length"] == length]
            metric = build_metric(TASKS[task].metric, TASKS[task].answer_prefix)
            rescored = [metric.score_one(r["output"], r["target"]) for r in rec]
            assert score == pytest.approx(100 * sum(rescored) / len(rescored))
            assert all(length - 3 - 2 <= r["prompt_tokens"] <= length - 3 for r in rec)  # budget L - max_new
    paths = write_report(results, tmp_path / "report")
    assert {p.name for p in paths.values()} == {
        "eval_results.json",
        "eval_report.md",
        "helmet_table.csv",
        "helmet_table.md",
        "score_vs_length.png",
        "needle_json_kv.png",
        "needle_ruler_niah_mk_2.png",
    }
    assert paths["score_vs_length"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| json_kv | recall | substring_exact_match |" in paths["markdown"].read_text()
    loaded = EvalResults.from_dict(json.loads(paths["json"].read_text()))
    assert loaded.flat() == flat and loaded.depth_scores == results.depth_scores
    image = figure_to_array(make_figures(results)["needle/json_kv"])
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_report(results, tmp_path / "report")


def test_run_evaluation_refuses_bad_requests_before_work(llama3_tokenizer):
    model = tiny_llama()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="unknown task.*known tasks: json_kv, ruler_niah_s_1"):
        run_evaluation(model, llama3_tokenizer, EvalSettings(tasks=["json_kv", "niah"], lengths=[256]), None)
    with pytest.raises(ValueError, match=r"\[8192\] exceed the model's max_position_embeddings \(4096\)"):
        run_evaluation(model, llama3_tokenizer, EvalSettings(tasks=["json_kv"], lengths=[1024, 8192]), 4096)
    with pytest.raises(ValueError, match="helmet_dir"):
        run_evaluation(model, llama3_tokenizer, EvalSettings(tasks=["json_kv", "kilt_nq"], lengths=[1024]), None)
    with pytest.raises(ValueError, match="json_kv needs at least"):
        run_evaluation(model, llama3_tokenizer, EvalSettings(tasks=["json_kv"], lengths=[64]), None)
    assert calls == []


def _eval_worker(rank: int, port: int, tokenizer_dir: str, queue) -> None:
    from prolong_lit.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = run_evaluation(
            tiny_llama(),
            load_tokenizer(tokenizer_dir),
            EvalSettings(tasks=["ruler_niah_s_1"], lengths=[256], depths=[0.5], samples_per_task=3, seed=0,
                         max_new_tokens=2),
            None,
        )
        queue.put((rank, results.records, results.flat(), results.generation["sequences"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_split_the_examples_and_gather_the_same_results(llama3_tokenizer, llama3_tokenizer_dir):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _eval_worker, args=(free_port(), str(llama3_tokenizer_dir), queue), nprocs=2, start_method="spawn"
    )
    got = dict((rank, rest) for rank, *rest in (queue.get() for _ in range(2)))
    single = run_evaluation(
        tiny_llama(),
        llama3_tokenizer,
        EvalSettings(tasks=["ruler_niah_s_1"], lengths=[256], depths=[0.5], samples_per_task=3, seed=0,
                     max_new_tokens=2),
        None,
    )
    for rank in (0, 1):  # 3 examples over 2 ranks: rank 1 ran a dummy batch to keep the forward passes in step
        records, flat, sequences = got[rank]
        assert [(r["index"], r["output"]) for r in records] == [(r["index"], r["output"]) for r in single.records]
        assert flat == single.flat() and sequences == 3
    assert not math.isnan(single.flat()["eval/ruler_niah_s_1@256"])
