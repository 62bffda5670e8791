"""What to evaluate: `EvalSettings`, defined once for the `LongContextEval` callback (its `settings` argument), the
`eval` command (its flags are the fields) and `run_evaluation`; and `check_settings`, every check against the
model and the tokenizer, run before any training step or model load.

`EvalSettings` refuses values that are wrong whatever the model (`__post_init__`); what depends on the model or
on files (task names, lengths against max_position_embeddings and each task's minimum, HELMET files and every
line of them, the tokenizer against the vocabulary) is `check_settings`'s. Its errors name the setting to fix
after a caller-chosen prefix: `LongContextEval.settings.lengths: ...` in a run, `--lengths: ...` on the command
line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from prolong_lit.evals.helmet import HelmetData, load_helmet_task
from prolong_lit.evals.registry import validate_request

# The synthetic recall tasks: they need no files, so an evaluation works on any run out of the box.
DEFAULT_TASKS = ("ruler_niah_s_1", "ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv", "json_kv")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class EvalSettings:
    """What to evaluate; shared by the LongContextEval callback and the `eval` command.

    Args:
        tasks: task names (prolong_lit.evals.registry.TASKS); default: the five synthetic recall tasks.
        lengths: evaluation lengths in tokens, each <= the model's max_position_embeddings; None: that maximum.
        depths: needle depths of the synthetic tasks (0.0 = start of the context, 1.0 = end), taken in turn.
        samples_per_task: examples per synthetic task and length; test items per HELMET task.
        seed: makes the prompts reproducible (the same examples at every evaluation).
        helmet_dir: HELMET's `data/` folder, needed by the HELMET file tasks.
        batch_size: prompts decoded together; 1 avoids padded attention at long lengths.
        max_new_tokens: caps every task's generation length; None: HELMET's per-task lengths.
        use_cache: decode with a KV cache; false re-runs the whole sequence per token (benchmarks only).
    """

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] | None = None
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    samples_per_task: int = 10
    seed: int = 42
    helmet_dir: str | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        # Only what is wrong whatever the model; the messages start with the field's name, like check_settings'.
        self.tasks = list(self.tasks)
        self.depths = [float(d) for d in self.depths]
        if self.lengths is not None:
            self.lengths = list(self.lengths)
        if not self.tasks:
            raise ValueError("tasks: give at least one evaluation task")
        if self.lengths is not None and (
            not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in self.lengths)
        ):
            raise ValueError(f"lengths: give positive integer token counts (or null), got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths: give needle depths between 0.0 and 1.0, got {self.depths}")
        for name in ("samples_per_task", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (or null for each task's own), got {self.max_new_tokens}")

    def resolved_lengths(self, max_position_embeddings: int | None) -> list[int]:
        """The lengths to evaluate: the given ones, else the model's maximum."""
        if self.lengths:
            return list(self.lengths)
        if max_position_embeddings is None:
            raise ValueError("lengths: give the evaluation lengths (the model's max_position_embeddings is unknown)")
        return [int(max_position_embeddings)]


def check_settings(
    settings: EvalSettings,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    max_position_embeddings: int,
    prefix: str,
    tokenizer_setting: str,
) -> HelmetData:
    """Every check that can fail before an evaluation starts, HELMET lines included.

    Errors name the setting to fix after `prefix` (`LongContextEval.settings.lengths: ...`, or `--lengths: ...`);
    a tokenizer larger than the model's vocabulary names `tokenizer_setting`. Returns the HELMET task data it read,
    {(task, length): data}, for the evaluations to use instead of reading the files again.
    """
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{tokenizer_setting}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab_size}; give the tokenizer the model was trained with"
        )
    lengths = settings.resolved_lengths(max_position_embeddings)
    try:  # its messages start with the setting's name ("lengths: ...", "helmet_dir: ...")
        specs = validate_request(
            settings.tasks, lengths, settings.depths, settings.samples_per_task, settings.helmet_dir,
            max_position_embeddings, tokenizer, settings.max_new_tokens,
        )
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{prefix}{err}") from err
    try:  # reads every line of every file: a malformed one is reported as file:line
        return {
            (spec.name, length): load_helmet_task(
                spec.name, settings.helmet_dir, length, settings.samples_per_task, settings.seed
            )
            for spec in specs
            if spec.source == "helmet"
            for length in lengths
        }
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{prefix}helmet_dir: {err}") from err
