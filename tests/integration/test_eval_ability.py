"""Evaluation measures ability, not noise.

A tiny Llama with a word-level test tokenizer is trained by a real Trainer on the project's own data path (litdata
shards, MixtureDataModule, LongContextLM with document-masked attention and a loss mask) with `LongContextEval`
attached and `eval_at_start=True`: the same callback code scores the randomly initialised model (step 0) and the
trained one (end of fit) on HELMET's RAG task `kilt_nq`, read from task files in HELMET's own format that this test
writes (`kilt/nq-dev-multikilt_1000_k20_dep6.jsonl`, demonstrations from
`kilt/nq-train-multikilt_1000_k3_dep6.jsonl`): HELMET's prompt with its 2 demonstrations, 3 passages per question,
one of them (at depth 0, 0.5 or 1) stating the answer, a 2-digit number; generation stops at the newline and is
scored by substring exact match after HELMET's normalisation.

Training documents are the same kind of prompt built by the same code from other draws, followed by the answer and a
newline; loss only on the answers: the question's and the two demonstrations' (each "Answer: N" line follows its own
passages). To answer, the model has to find the passage that states a number among the passages of the current
question (not the demonstrations') and copy it.

Why this task. Measured while choosing it (2 layers, hidden 128): a model of this size learns to copy a one-token
value from the passage that states it within a few hundred steps, but needs thousands of steps for anything that
takes an induction head: matching a key (JSON KV with 8 one-token keys: no progress in 1,500 steps) or copying a
multi-token value in order (RULER's 7-digit needle as 4 digit-pair tokens: 5% to 75% after 1,250 steps depending on
the seed). The loss on the demonstrations' answers triples the signal per row (a plain training loop at a constant
3e-3, seeds 0/1/2: loss on the question's answer only, 55% / 47.5% / 7.5% after 500 steps; with the demonstrations'
answers, 82.5% / 67.5% / 97.5% after 400). Demonstrations whose answers are words instead of numbers: 0% after 300
steps (their answers were most of the number-copying signal).

This test's setting, seeds 0-3 of `seed_everything`: 0% for each untrained model; 87.5% / 40% / 67.5% / 95% after
400 steps (~110 s on 2 cores). Nearly all wrong answers (59 of 60 looked at) are numbers that occur nowhere in the
prompt (the copy is not yet sharp), not another passage's or a demonstration's. Hence the bound: at least 25%,
against 0-2.5% by chance.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from prolong_lit.callbacks.long_eval import LongContextEval
from prolong_lit.data.datamodule import MixtureDataModule
from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK
from prolong_lit.evals import EvalResults, EvalSettings, prompts, wordlists
from prolong_lit.evals.helmet import build_helmet_example, load_helmet_task
from prolong_lit.evals.helmet_files import KILT_K, RAG_FILES
from prolong_lit.evals.registry import TASKS
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.optim import AdamW, WarmupCosine
from prolong_lit.model.settings import LlamaSettings
from tests.helpers.data_factory import write_domains

pytestmark = pytest.mark.slow

TASK = "kilt_nq"
EVAL_LENGTH = 256  # HELMET's budget L - 20 new tokens holds the whole prompt (223-229 tokens): nothing is cut
SEQ_LEN = 232  # a training row: one document (prompt + answer) and a padding document without loss
PASSAGES = 3
TITLES = list(wordlists.NOUNS)
FILLER = [sentence.strip() + "." for sentence in wordlists.NOISE.split(".") if sentence.strip()]
STEPS = 400
EVAL_ITEMS = 40
TRAIN_SEED, EVAL_SEED = 1, 2
SCORE = f"eval/{TASK}@{EVAL_LENGTH}"


def kilt_record(rng: random.Random, passages: int) -> dict:
    """One question in HELMET's KILT format: `passages` titled passages, one of which states the answer."""
    titles = rng.sample(TITLES, passages)
    gold = rng.randrange(passages)
    answer = str(rng.randint(10, 99))
    texts = [
        f"The vault code of the {t} is {answer}." if i == gold else " ".join(rng.sample(FILLER, 2))
        for i, t in enumerate(titles)
    ]
    ctxs = [{"title": t, "text": text} for t, text in zip(titles, texts)]
    return {
        "id": f"q{rng.getrandbits(48):012x}",
        "question": f"What is the vault code of the {titles[gold]}?",
        "answers": [answer],
        "ctxs": ctxs,
        "depth": gold / (passages - 1),
    }


def write_kilt_files(helmet_dir: Path, seed: int, questions: int) -> None:
    """The test file HELMET reads for lengths up to 4K and the demonstration pool (3 passages each)."""
    rng = random.Random(seed)
    test_file, demo_file = kilt_files()
    for rel, count, passages in ((test_file, questions, PASSAGES), (demo_file, 200, 3)):
        path = helmet_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(kilt_record(rng, passages)) + "\n" for _ in range(count)))


def kilt_files() -> tuple[str, str]:
    test_pattern, demo_file = RAG_FILES[TASK]
    return test_pattern.format(k=KILT_K[4096]), demo_file


def train_tokenizer(out_dir: Path):
    """A word-level tokenizer over the prompts' words (a word with its leading space is one token, as is a number);
    BOS added on encode. 240 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = pre_tokenizers.Split(Regex(r" ?[0-9]+| ?[A-Za-z]+| ?[^A-Za-z0-9\s]+|\s+"), "isolated")
    texts = [
        prompts.RAG_USER, prompts.RAG_PREFIX, prompts.RAG_DEMO, prompts.RAG_PASSAGE, " " + " ".join(FILLER),
        "Document (Title: x): The vault code of the x is 10.\n\nQuestion: What is the vault code of the x?\nAnswer: 10",
        *(f" {t}" for t in TITLES), *(f" {n}" for n in range(10, 100)),
    ]
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    for text in texts:
        for piece, _ in pieces.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pieces
    backend.decoder = decoders.Fuse()  # the pieces carry their spaces: decoding concatenates them
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>", clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def training_rows(helmet_dir: Path, tokenizer) -> list[dict[str, np.ndarray]]:
    """Every question of `helmet_dir` as a SEQ_LEN row: its evaluation prompt, the answer and a newline; the loss
    mask covers the answers (the question's and each demonstration's), then a padding document follows."""
    budget = EVAL_LENGTH - TASKS[TASK].max_new_tokens
    data = load_helmet_task(TASK, helmet_dir, EVAL_LENGTH, samples=10**6, seed=0)
    answer_line = tokenizer.convert_tokens_to_ids(["Answer", ":"])
    rows = []
    for index in range(len(data.records)):
        example = build_helmet_example(data, index, tokenizer, budget)
        ids = example.input_ids + tokenizer(f" {example.target[0]}\n", add_special_tokens=False)["input_ids"]
        mask = [0] * len(example.input_ids) + [1] * (len(ids) - len(example.input_ids))
        for i in range(len(example.input_ids) - 2):  # the demonstrations' "Answer: N"
            if ids[i : i + 2] == answer_line and tokenizer.convert_ids_to_tokens(ids[i + 2]).strip().isdigit():
                mask[i + 2] = 1
        assert tokenizer.unk_token_id not in ids, "the test tokenizer misses a word of the prompt"
        assert sum(mask) == 4, "the loss should cover 2 demonstration answers, the answer and its newline"
        pad = SEQ_LEN - len(ids)
        rows.append({
            INPUT_IDS: np.array(ids + [tokenizer.pad_token_id] * pad, dtype=np.int32),
            DOC_LENGTHS: np.array([len(ids), pad], dtype=np.int32),
            LOSS_MASK: np.array(mask + [0] * pad, dtype=np.uint8),
        })
    return rows


def read_score(evals: Path, step: int) -> tuple[float, list[dict]]:
    results = EvalResults.from_dict(json.loads((evals / f"step{step:06d}" / "eval_results.json").read_text()))
    return results.flat()[SCORE], results.records


def test_trained_model_scores_far_above_untrained(tmp_path):
    tokenizer = train_tokenizer(tmp_path / "tokenizer")
    write_kilt_files(tmp_path / "helmet-train", TRAIN_SEED, questions=3000)
    write_kilt_files(tmp_path / "helmet", EVAL_SEED, questions=EVAL_ITEMS)
    rows = training_rows(tmp_path / "helmet-train", tokenizer)
    write_domains(tmp_path / "data", {"rag": (rows.__getitem__, len(rows), True)}, SEQ_LEN, len(tokenizer),
                  tokenizer="test-words", chunk_bytes="1MB")
    seed_everything(0)
    overrides = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 4, "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    module = LongContextLM(
        llama=LlamaSettings(name_or_path="tiny", overrides=overrides, rope_theta=10000.0, max_position_embeddings=512),
        seq_len=SEQ_LEN,
        optimizer=functools.partial(AdamW, lr=2e-3, weight_decay=0.0),
        scheduler=functools.partial(WarmupCosine, warmup_steps=20, min_lr_ratio=0.1),
    )
    data = MixtureDataModule(str(tmp_path / "data"), {"rag": 1.0}, seq_len=SEQ_LEN, micro_batch_size=16,
                             val_samples_per_domain=0, num_workers=0)
    settings = EvalSettings(tasks=[TASK], lengths=[EVAL_LENGTH], samples_per_task=EVAL_ITEMS,
                            helmet_dir=str(tmp_path / "helmet"), batch_size=20)
    callback = LongContextEval(tokenizer=str(tmp_path / "tokenizer"), settings=settings, eval_at_start=True)
    trainer = Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=STEPS, gradient_clip_val=1.0,
        logger=TensorBoardLogger(str(tmp_path / "runs"), name="ability", version=0), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
    )
    trainer.fit(module, data)

    evals = tmp_path / "runs" / "ability" / "version_0" / "evals"
    before, _ = read_score(evals, 0)
    after, records = read_score(evals, STEPS)
    outputs = [(r["output"], r["target"]) for r in records[:8]]
    assert before <= 5.0, f"the untrained model scored {before}"
    assert after >= 25.0, f"the trained model scored {after} (untrained {before}); outputs {outputs}"
