"""Evaluation measures ability, not noise.

A tiny Llama with a small byte-level BPE vocabulary is trained by a real Trainer on the project's own data path
(litdata shards, MixtureDataModule, LongContextLM) with `LongContextEval` attached, `eval_at_start=True`: the same
callback code scores the randomly initialised model (step 0) and the trained one (end of fit) on held-out
`ruler_niah_s_1` prompts (another seed, so other keys, values and depths than in training).

Training data, two domains of the mixture:
- `retrieval`: ruler_niah_s_1 prompts from the project's generator followed by their answer (" <7 digits>." EOS),
  loss on the answer only: the needle's value must be found in the context and copied;
- `copy`: random digit-pair sequences shown twice, loss on the second copy: the plain copying skill (induction)
  that retrieval needs, which a tiny model picks up much faster from dense examples.
The tokenizer splits numbers into digit pairs (as Llama-3 splits them into triples), so a 7-digit value is 4 tokens.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from prolong_lit.callbacks.long_eval import LongContextEval
from prolong_lit.data.datamodule import MixtureDataModule
from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK, DomainStats, Manifest
from prolong_lit.evals import build_synthetic_example, prompts, wordlists
from prolong_lit.model.module import LongContextLM

pytestmark = pytest.mark.slow

SEQ_LEN = 160  # training rows
EVAL_LENGTH = 150  # the shortest ruler_niah_s_1 prompt with this tokenizer is ~135 tokens
TRAIN_SEED, EVAL_SEED = 1234, 42
import os
STEPS = int(os.environ.get('ABILITY_STEPS', 400))


def train_tokenizer(out_dir: Path):
    """A 640-token byte-level BPE trained on the task's own text (well under a second); BOS added on encode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = list(wordlists.ESSAY)
    for _ in range(1000):
        key = f"{rng.choice(wordlists.ADJECTIVES)}-{rng.choice(wordlists.NOUNS)}"
        value = str(rng.randint(10**6, 10**7 - 1))
        needle = prompts.RULER_NEEDLE.format(type_needle_v="numbers", key=key, value=value)
        user = prompts.RULER_SINGLE_USER.format(type_needle_v="number", context=wordlists.NOISE + "\n" + needle,
                                                query=key)
        prefix = prompts.RULER_SINGLE_PREFIX.format(type_needle_v="number", query=key)
        texts.append(prompts.completion_prompt(user, prefix) + f" {value}.")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[0-9]{1,2}"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=640, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ))
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))]),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _row(first: list[int], first_mask: list[int], pad_id: int) -> dict[str, np.ndarray]:
    """One SEQ_LEN row: the document, then a padding document that carries no loss."""
    pad = SEQ_LEN - len(first)
    assert pad >= 1, len(first)
    return {
        INPUT_IDS: np.array(first + [pad_id] * pad, dtype=np.int32),
        DOC_LENGTHS: np.array([len(first), pad], dtype=np.int32),
        LOSS_MASK: np.array(first_mask + [0] * pad, dtype=np.uint8),
    }


def retrieval_row(index: int, tokenizer) -> dict[str, np.ndarray]:
    rng = random.Random(index)
    example = build_synthetic_example("ruler_niah_s_1", tokenizer, rng.choice([140, 150]), rng.random(), index,
                                      TRAIN_SEED)
    answer = tokenizer(f" {example.target[0]}.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = example.input_ids + answer
    return _row(ids, [0] * len(example.input_ids) + [1] * len(answer), tokenizer.pad_token_id)


def copy_row(index: int, tokenizer) -> dict[str, np.ndarray]:
    """Documents `<bos> s s` (s: 5-20 random digit pairs) packed into a row; loss on each second copy."""
    rng = random.Random(10**6 + index)
    pairs = sorted(i for t, i in tokenizer.get_vocab().items() if len(t) == 2 and t.isdigit())
    ids, mask, lengths = [], [], []
    while True:
        seq = [rng.choice(pairs) for _ in range(rng.randint(5, 20))]
        if len(ids) + 1 + 2 * len(seq) > SEQ_LEN - 1:
            break
        ids += [tokenizer.bos_token_id] + seq + seq
        mask += [0] * (1 + len(seq)) + [1] * len(seq)
        lengths.append(1 + 2 * len(seq))
    row = _row(ids, mask, tokenizer.pad_token_id)
    row[DOC_LENGTHS] = np.array(lengths + [SEQ_LEN - len(ids)], dtype=np.int32)
    return row


def write_domains(data_dir: Path, tokenizer, samples: int) -> None:
    import litdata

    stats = {}
    for name, fn in (("retrieval", retrieval_row), ("copy", copy_row)):
        litdata.optimize(fn=partial(fn, tokenizer=tokenizer), inputs=list(range(samples)),
                         output_dir=str(data_dir / name), chunk_bytes="1MB", num_workers=1, mode="overwrite",
                         verbose=False, start_method="fork")
        stats[name] = DomainStats(samples=samples, tokens=samples * SEQ_LEN, max_token_id=len(tokenizer) - 1,
                                  has_loss_mask=True, documents={"read": samples, "kept": samples})
    Manifest(tokenizer="test-bpe", vocab_size=len(tokenizer), seq_len=SEQ_LEN, domains=stats).write(data_dir)


def test_trained_model_scores_far_above_untrained(tmp_path):
    torch.set_num_threads(1)
    tokenizer = train_tokenizer(tmp_path / "tokenizer")
    write_domains(tmp_path / "data", tokenizer, samples=1000)
    seed_everything(0)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    module = LongContextLM(
        model="tiny",
        model_overrides={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True, **special},
        rope_theta=100.0,
        max_position_embeddings=512,
        seq_len=SEQ_LEN,
        lr=3e-3,
        weight_decay=0.0,
        warmup_steps=20,
    )
    data = MixtureDataModule(str(tmp_path / "data"), {"retrieval": 0.5, "copy": 0.5}, seq_len=SEQ_LEN,
                             micro_batch_size=8, val_samples_per_domain=0, num_workers=0)
    callback = LongContextEval(
        tokenizer=str(tmp_path / "tokenizer"),
        tasks=["ruler_niah_s_1"],
        lengths=[EVAL_LENGTH],
        samples_per_task=20,
        seed=EVAL_SEED,
        eval_at_start=True,
        batch_size=10,
        max_new_tokens=8,
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=STEPS, gradient_clip_val=1.0,
        logger=TensorBoardLogger(str(tmp_path / "runs"), name="ability", version=0), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=50,
    )
    trainer.fit(module, data)

    evals = tmp_path / "runs" / "ability" / "version_0" / "evals"
    from prolong_lit.evals import EvalResults
    import json

    untrained = EvalResults.from_dict(json.loads((evals / "step000000" / "eval_results.json").read_text()))
    trained = EvalResults.from_dict(json.loads((evals / f"step{STEPS:06d}" / "eval_results.json").read_text()))
    before = untrained.flat()["eval/ruler_niah_s_1@150"]
    after = trained.flat()["eval/ruler_niah_s_1@150"]
    print("scores", before, after, [r["output"] for r in trained.records[:5]])
    assert before <= 10.0
    assert after >= 50.0
