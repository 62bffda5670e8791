"""Long-context evaluation: synthetic tasks (JSON KV, RULER), HELMET's file tasks, greedy generation, metrics, reports.

Pure PyTorch/transformers code (no Lightning): it works on any transformers causal LM and its tokenizer. A
Lightning callback only schedules `run_evaluation` and logs `EvalResults.flat()` and `report.make_figures()`.

Modules:
    registry       task names -> category, metric, answer prefix, generation length; checks run before any work
    synthetic      JSON KV and RULER tasks generated from a seed, sized to the budget in tokenizer tokens, needle depths
    haystack       fitting a haystack of units with needles at given depths to a token budget
    ruler          RULER's task table, HELMET's RULER templates, cwe / fwe word lists, vt chains
    ruler_files    HELMET's own RULER files (`helmet_ruler_*`, `ruler_qa_1/2`): schema, sampling, prompt parts
    helmet_files   HELMET's file layout and line schemas, a reader reporting file:line, the ICL JSONL converter
    helmet         HELMET's loaders: sampling, 2-shot demonstrations, prompts cut to fit the length
    longdoc        LongQA (NarrativeQA, InfBench QA/choice) and summarization (InfBench Sum, Multi-LexSum) files
    citations      ALCE ASQA / QAMPARI files, HELMET's prompt files, passages per length
    nli            citation recall/precision of ALCE outputs with a local NLI model
    prompts        HELMET's templates, completion or chat-template rendering, context truncation
    generation     greedy batched decoding with or without a KV cache, stop at newline/EOS, cost statistics
    metrics        EM, substring EM, F1, RULER recall, accuracy, NDCG@10, ROUGE-L/Lsum, ALCE str_em/rec@5
    normalize      SQuAD-style answer normalisation, output and ranking parsing
    position_loss  mean NLL per position bucket on long documents
    settings       EvalSettings (what to evaluate) and check_settings (every check before the model loads)
    runner         run_evaluation
    results        EvalExample, EvalResults (flat scalars, JSON schema)
    report         JSON + Markdown report and matplotlib figures
    categories     HELMET's categories (collect_results), incomplete ones not computed; the `helmet` preset
    table          HELMET's results table (lengths x categories and tasks) as CSV and Markdown
    catalog        the task list of `eval --list_tasks`
"""

from prolong_lit.evals.generation import GenerationStats, greedy_generate, stop_token_ids
from prolong_lit.evals.helmet_files import write_icl_jsonl
from prolong_lit.evals.metrics import METRICS, build_metric
from prolong_lit.evals.position_loss import loss_by_position
from prolong_lit.evals.registry import CATEGORIES, TASKS
from prolong_lit.evals.report import figure_to_array, make_figures, write_report
from prolong_lit.evals.results import EvalExample, EvalResults
from prolong_lit.evals.runner import run_evaluation
from prolong_lit.evals.settings import DEFAULT_DEPTHS, DEFAULT_TASKS, EvalSettings, check_settings
from prolong_lit.evals.synthetic import build_synthetic_example

__all__ = [
    "CATEGORIES",
    "DEFAULT_DEPTHS",
    "DEFAULT_TASKS",
    "METRICS",
    "TASKS",
    "EvalExample",
    "EvalResults",
    "EvalSettings",
    "GenerationStats",
    "build_metric",
    "build_synthetic_example",
    "check_settings",
    "figure_to_array",
    "greedy_generate",
    "loss_by_position",
    "make_figures",
    "run_evaluation",
    "stop_token_ids",
    "write_icl_jsonl",
    "write_report",
]
