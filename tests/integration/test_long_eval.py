"""LongContextEval inside `fit` on the demo config (callbacks/long_eval.yaml added as a second --config), the `eval`
command on the saved model (checkpoint and Hugging Face directory), two ranks against one, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prolong_lit.cli import main
from prolong_lit.commands.eval import main as eval_main
from prolong_lit.commands.eval import settings_from_yaml
from prolong_lit.evals import EvalSettings
from tests.helpers.data_factory import write_prepared
from tests.helpers.run_helpers import CHECKPOINTS, DOMAINS, LOGS, REPO, SEQ_LEN, demo_config, read_scalars, run_dir

BUNDLE = REPO / "callbacks" / "long_eval.yaml"
# Short prompts, few tokens: a nearly random model never stops, so generation length is what costs.
EVAL_ARGS = {
    "tasks": ["ruler_niah_s_1", "json_kv"],
    "lengths": [256, 320],
    "depths": [0.0, 0.5, 1.0],
    "samples_per_task": 3,
    "max_new_tokens": 6,
    "every_n_steps": 3,
}
REPORT_FILES = {"eval_results.json", "eval_report.md", "helmet_table.csv", "helmet_table.md", "score_vs_length.png",
                "needle_ruler_niah_s_1.png", "needle_json_kv.png"}
# One task of each HELMET category (and RULER), on HELMET-format fixture files (file tasks) or generated.
CATEGORY_TASKS = {"recall": "json_kv", "ruler": "ruler_niah_s_1", "rag": "kilt_nq", "rerank": "msmarco_rerank_psg",
                  "icl": "icl_trec_coarse", "longqa": "infbench_qa_eng", "summ": "multi_lexsum", "cite": "alce_asqa"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prepared")
    write_prepared(path, DOMAINS, seq_len=SEQ_LEN)
    return path


def fit_args(config: Path, **init_args) -> list[str]:
    """`fit` on `config` plus the bundle; init_args override the bundle's (they apply to the last callback), and
    those named like EvalSettings' fields go into its `settings`."""
    args = ["fit", "--config", str(config), "--config", str(BUNDLE)]
    settings = {f.name for f in dataclasses.fields(EvalSettings)}
    # strings go as they are: a JSON-quoted path would keep its quotes
    return args + [
        f"--trainer.callbacks.init_args.{'settings.' if k in settings else ''}{k}="
        f"{v if isinstance(v, str) else json.dumps(v)}"
        for k, v in init_args.items()
    ]


def read_report(folder: Path) -> dict:
    return json.loads((folder / "eval_results.json").read_text())


def same_evaluation(a: dict, b: dict) -> None:
    """Same scores, and the same generated text for every example."""
    assert a["scores"] == b["scores"] and a["depth_scores"] == b["depth_scores"]
    assert a["categories"] == b["categories"]
    key = lambda r: (r["task"], r["length"], r["index"], r["depth"], r["output"], r["score"])  # noqa: E731
    assert [key(r) for r in a["records"]] == [key(r) for r in b["records"]]


def test_bundle_holds_a_complete_evaluation_setting():
    args = settings_from_yaml(BUNDLE)
    assert args["tokenizer"] == "llama3" and args["tasks"] and args["lengths"]


def test_callback_logs_scalars_pictures_and_reports_and_eval_command_agrees(tmp_path, data_dir, llama3_tokenizer_dir):
    config = demo_config(tmp_path, data_dir, "ev", max_steps=4)
    main(fit_args(config, **EVAL_ARGS))
    log_dir = run_dir(tmp_path, "ev") / LOGS

    # scalars at step 3 (every_n_steps) and 4 (end of fit), one per task@length; no category: HELMET's recall
    # also needs ruler_niah_mk_2, mk_3 and mv (test_every_category_end_to_end has complete ones)
    scalars = read_scalars(log_dir)
    tags = [f"eval/{t}@{n}" for t in EVAL_ARGS["tasks"] for n in EVAL_ARGS["lengths"]]
    assert not [tag for tag in scalars if tag.startswith("eval/category/")]
    for tag in tags:
        assert [step for step, _ in scalars.get(tag, [])] == [3, 4], f"{tag}: {scalars.get(tag)}"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    for tag in ("eval/score_vs_length", "eval/needle/ruler_niah_s_1", "eval/needle/json_kv"):
        images = events.Images(tag)
        assert [i.step for i in images] == [3, 4]
        assert images[-1].encoded_image_string[:4] == b"\x89PNG" and images[-1].width > 100

    # a report per evaluation; its numbers are the logged ones
    for step in (3, 4):
        folder = log_dir / "evals" / f"step{step:06d}"
        assert {p.name for p in folder.iterdir()} == REPORT_FILES
        report = read_report(folder)
        assert len(report["records"]) == 2 * 2 * 3 and report["num_examples"]["json_kv"] == {"256": 3, "320": 3}
        for task, by_length in report["scores"].items():
            for length, score in by_length.items():
                logged = dict(scalars[f"eval/{task}@{length}"])[step]
                assert logged == pytest.approx(score, abs=1e-4)
        depths = report["depth_scores"]["ruler_niah_s_1"]["256"]
        assert set(depths) == {"0.0", "0.5", "1.0"}
    assert "| ruler_niah_s_1 | ruler | ruler_recall |" in (log_dir / "evals/step000004/eval_report.md").read_text()
    final = read_report(log_dir / "evals" / "step000004")
    assert len({r["output"] for r in final["records"]}) > 1  # real generations, not one constant string

    # the eval command on the saved checkpoint (same step as the last evaluation) gives the same evaluation:
    # settings from the run's saved config, then from the callback state stored in the checkpoint
    checkpoint = run_dir(tmp_path, "ev") / CHECKPOINTS / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 4
    eval_main(["--model", str(checkpoint), "--config", str(log_dir / "config.yaml"), "--output", str(tmp_path / "c1")])
    same_evaluation(read_report(tmp_path / "c1"), final)
    assert {p.name for p in (tmp_path / "c1").iterdir()} == REPORT_FILES
    eval_main(["--model", str(checkpoint), "--output", str(tmp_path / "c2")])
    same_evaluation(read_report(tmp_path / "c2"), final)

    # ... and on a Hugging Face directory exported from it (plain transformers loading)
    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    eval_main(["--model", str(hf_dir), "--config", str(log_dir / "config.yaml"), "--tokenizer",
               str(llama3_tokenizer_dir), "--output", str(tmp_path / "c3")])
    same_evaluation(read_report(tmp_path / "c3"), final)

    with pytest.raises(FileExistsError, match="--overwrite"):  # refused before any model is loaded
        eval_main(["--model", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "c1")])


def test_every_category_end_to_end(tmp_path, data_dir):
    """A fit with the callback evaluates one task of every category (HELMET files written in HELMET's formats for
    the file tasks): a score per task, HELMET's categories where complete (re-rank: one task), the others listed
    as incomplete, the table in the evaluation folder and the category scalars in TensorBoard."""
    from tests.helpers.helmet_data import write_alce, write_longdoc
    from tests.unit.test_eval_helmet import write_helmet_dir

    helmet = write_helmet_dir(tmp_path / "helmet")
    write_longdoc(helmet / "data")
    write_alce(helmet / "data", helmet / "prompts")
    tasks = list(CATEGORY_TASKS.values())
    config = demo_config(tmp_path, data_dir, "all", max_steps=1)
    main(fit_args(config, tasks=tasks, lengths=[1024], samples_per_task=1, max_new_tokens=4, every_n_steps=None,
                  helmet_dir=str(helmet)))
    log_dir = run_dir(tmp_path, "all") / LOGS
    report = read_report(log_dir / "evals" / "step000001")
    assert set(report["scores"]) == set(tasks) and all(report["scores"][t]["1024"] is not None for t in tasks)
    assert {report["task_categories"][t] for t in tasks} == set(CATEGORY_TASKS)
    assert report["category_scores"] == {"rerank": {"1024": report["scores"]["msmarco_rerank_psg"]["1024"]}}
    assert set(report["incomplete_categories"]) == {"recall", "ruler", "rag", "icl", "longqa", "summ", "cite",
                                                    "helmet"}
    assert report["incomplete_categories"]["cite"][:1] == ["alce_asqa citation_rec"]  # no NLI model: not computed
    scalars = read_scalars(log_dir)
    assert [step for step, _ in scalars["eval/category/rerank@1024"]] == [1] and "eval/category/rerank" in scalars
    assert not [tag for tag in scalars if tag.startswith("eval/category/") and "rerank" not in tag]
    table = (log_dir / "evals/step000001/helmet_table.csv").read_text().splitlines()
    assert table[0].split(",")[:9] == ["length", "recall", "rag", "icl", "cite", "rerank", "longqa", "summ", "ruler"]
    assert table[1].startswith("1024,,,,,") and len(table) == 3


def export_hf(checkpoint: Path, out: Path) -> Path:
    """A Hugging Face directory from a LongContextLM checkpoint, written with plain transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = LlamaForCausalLM(LlamaConfig.from_dict(saved["hf_config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in saved["state_dict"].items()})
    model.save_pretrained(str(out))
    return out


def _helmet_dir(root: Path, bad_line: str | None) -> Path:
    """A HELMET data folder with JSON KV's 4K file: one good line and, optionally, a bad second line."""
    good = {"context": '{"a": "b"}', "question": "a", "answer": "b", "demos": [["c", "d"], ["e", "f"]]}
    (root / "json_kv").mkdir(parents=True)
    lines = [json.dumps(good)] + ([bad_line] if bad_line else [])
    (root / "json_kv" / "test_k50_dep6.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(
    "case",
    ["unknown_task", "too_long", "helmet_missing", "helmet_malformed", "tokenizer_too_big"],
)
def test_bad_settings_fail_in_setup_before_training(tmp_path, data_dir, case, capsys):
    extra: list[str] = []
    args = {"tasks": ["ruler_niah_s_1"], "lengths": [256], "samples_per_task": 1}
    if case == "unknown_task":
        args["tasks"] = ["ruler_niah_s_1", "needle"]
        match = r"LongContextEval\.settings\.tasks: unknown task\(s\) \['needle'\]"
    elif case == "too_long":
        args["lengths"] = [256, 16384]
        match = r"LongContextEval\.settings\.lengths: \[16384\] exceed .*embeddings \(8192\)"
    elif case == "helmet_missing":
        (tmp_path / "helmet").mkdir()
        args.update(tasks=["kilt_nq"], lengths=[1024], helmet_dir=str(tmp_path / "helmet"))
        match = r"LongContextEval\.settings\.helmet_dir: 2 HELMET file\(s\) missing"
    elif case == "helmet_malformed":
        helmet = _helmet_dir(tmp_path / "helmet", '{"context": "x", "question": 3, "answer": "b", "demos": []}')
        args.update(tasks=["helmet_json_kv"], lengths=[1024], helmet_dir=str(helmet))
        match = r"(?s)LongContextEval\.settings\.helmet_dir: .*k50_dep6\.jsonl:2: field 'question'"
    else:
        extra = ["--model.init_args.llama.overrides", '{"vocab_size": 1000}']
        match = r"LongContextEval\.tokenizer: the tokenizer has 128256 tokens .* vocab_size is 1000"
    # a user's mistake: `python -m prolong_lit` prints it on one line and exits 2 (prolong_lit.errors)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(demo_config(tmp_path, data_dir, "bad", max_steps=2), **args) + extra)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert re.search(match, message), message[-2000:]
    assert not (run_dir(tmp_path, "bad") / CHECKPOINTS).exists()  # no training step ran
    assert not list(run_dir(tmp_path, "bad").rglob("evals"))


@pytest.mark.distributed
def test_two_process_evaluation_matches_one_process(tmp_path, data_dir):
    """DDP fit with the callback on 2 CPU ranks (gloo): the examples are split, the report equals 1 process's."""
    config = demo_config(tmp_path, data_dir, "ddp", max_steps=2)
    args = {**EVAL_ARGS, "every_n_steps": None, "samples_per_task": 3}  # 3 examples: rank 1 runs a dummy batch
    command = [sys.executable, "-m", "prolong_lit", *fit_args(config, **args),
               "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    two_ranks = read_report(run_dir(tmp_path, "ddp") / LOGS / "evals" / "step000002")
    assert two_ranks["generation"]["sequences"] == 12

    eval_main(["--model", str(run_dir(tmp_path, "ddp") / CHECKPOINTS / "last.ckpt"), "--output", str(tmp_path / "one")])
    same_evaluation(read_report(tmp_path / "one"), two_ranks)
