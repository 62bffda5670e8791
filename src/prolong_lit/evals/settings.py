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

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from prolong_lit.errors import ConfigError, DataError, MissingPathError, UserError
from prolong_lit.evals.helmet import HelmetData, load_helmet_task
from prolong_lit.evals.registry import TaskSpec, validate_request

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
        use_chat_template: put each prompt in the tokenizer's chat template (as HELMET evaluates instruct models);
            None: HELMET's per-task default (on for longqa, summ and cite, off for the others); false for a base
            model, as HELMET's README says.
        nli_model_dir: a local NLI model directory (HELMET: google/t5_xxl_true_nli_mixture) for the citation
            recall/precision of the cite tasks; None: those two are reported as not computed.
        task_samples: per-task sample counts that replace samples_per_task (e.g. {icl_nlu: 500}).
        preset: `helmet`: HELMET's suite (its tasks that are registered, the file versions where both exist),
            lengths 8K-128K, 100 samples per task and 500 per ICL task; it fills every field left at its default.
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
    use_chat_template: bool | None = None
    nli_model_dir: str | None = None
    task_samples: dict[str, int] = field(default_factory=dict)
    preset: str | None = None

    def __post_init__(self) -> None:
        # Only what is wrong whatever the model; the messages start with the field's name, like check_settings'.
        if self.preset is not None:
            _apply_preset(self)
        self.task_samples = dict(self.task_samples)
        bad = {k: v for k, v in self.task_samples.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"task_samples: give positive integer sample counts, got {bad}")
        self.tasks = list(self.tasks)
        self.depths = [float(d) for d in self.depths]
        if self.lengths is not None:
            self.lengths = list(self.lengths)
        if not self.tasks:
            raise ConfigError("tasks: give at least one evaluation task")
        if self.lengths is not None and (
            not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in self.lengths)
        ):
            raise ConfigError(f"lengths: give positive integer token counts (or null), got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"depths: give needle depths between 0.0 and 1.0, got {self.depths}")
        for name in ("samples_per_task", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (or null for each task's own), got {self.max_new_tokens}")

    def chat_for(self, spec: TaskSpec) -> bool:
        """Whether `spec`'s prompts go through the chat template: the setting, else the task's HELMET default."""
        return spec.chat if self.use_chat_template is None else bool(self.use_chat_template)

    def samples_for(self, task: str) -> int:
        """Examples (synthetic) or test items (HELMET files) of `task` per length."""
        return self.task_samples.get(task, self.samples_per_task)

    def resolved_lengths(self, max_position_embeddings: int | None) -> list[int]:
        """The lengths to evaluate: the given ones, else the model's maximum."""
        if self.lengths:
            return list(self.lengths)
        if max_position_embeddings is None:
            raise ConfigError("lengths: give the evaluation lengths (the model's max_position_embeddings is unknown)")
        return [int(max_position_embeddings)]


def _apply_preset(settings: EvalSettings) -> None:
    """Fill the fields still at their defaults from the named preset (`categories.PRESETS`)."""
    from prolong_lit.evals.categories import PRESETS  # late: categories reads the registry

    if settings.preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {settings.preset!r}; known: {sorted(PRESETS)}")
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(settings)}
    for name, value in PRESETS[settings.preset]().items():
        if getattr(settings, name) == defaults[name]:
            setattr(settings, name, value)


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
        raise ConfigError(
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
        raise _named(err, prefix) from err
    _check_chat_and_nli(settings, specs, tokenizer, prefix)
    try:  # reads every line of every file: a malformed one is reported as file:line
        return {
            (spec.name, length): load_helmet_task(
                spec.name, settings.helmet_dir, length, settings.samples_for(spec.name), settings.seed, tokenizer
            )
            for spec in specs
            if spec.source == "helmet"
            for length in lengths
        }
    except (ValueError, FileNotFoundError) as err:
        raise _named(err, f"{prefix}helmet_dir: ", DataError) from err


def _named(err: Exception, prefix: str, plain: type[UserError] = ConfigError) -> UserError:
    """`err` with `prefix` before its message, as the user error it is: its own type when it already is one, a
    MissingPathError for a missing file, else `plain` (a subclass such as UnicodeDecodeError or JSONDecodeError
    cannot be rebuilt from one message either)."""
    if isinstance(err, UserError):
        return type(err)(f"{prefix}{err}")
    if isinstance(err, FileNotFoundError):
        return MissingPathError(f"{prefix}{err}")
    return plain(f"{prefix}{err}")


def _check_chat_and_nli(settings: EvalSettings, specs: list[TaskSpec], tokenizer, prefix: str) -> None:
    chat = [s.name for s in specs if settings.chat_for(s)]
    if chat and getattr(tokenizer, "chat_template", None) is None:
        given = "true" if settings.use_chat_template else "None, HELMET's default for these tasks"
        raise ConfigError(
            f"{prefix}use_chat_template: it is {given}, so {chat} are prompted through the chat template, but the "
            "tokenizer has none; give a tokenizer with a chat template or set use_chat_template to false"
        )
    if settings.nli_model_dir is not None and not (Path(settings.nli_model_dir) / "config.json").is_file():
        raise ConfigError(
            f"{prefix}nli_model_dir: {settings.nli_model_dir} is not a Hugging Face model directory (no config.json)"
        )
