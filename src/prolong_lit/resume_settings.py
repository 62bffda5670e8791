"""What a resume (`fit --ckpt_path <checkpoint>`) does with the model settings of the config it is given.

Lightning's CLI silently replaces `model.*` by the hyper-parameters recorded in the checkpoint, so a config with
another learning rate, or even another model, resumed the old one without a word. Here the choice is explicit,
`--resume_settings`:

- `config` (the default): the config given applies. Settings that change what the checkpoint's weights mean
  (`model.class_path`, `model.llama.*`: the architecture, the RoPE base, the position range; `model.seq_len`) must
  equal the recorded ones, or the resume is refused with every differing setting named. The others apply from the
  resumed step on, each logged: the optimizer's hyper-parameters (a new learning rate is a legitimate wish; the
  AdamW moments are kept) and the schedule (warmup, minimum ratio; its position is the resumed step), and the
  kernels (numerically equivalent implementations).
- `checkpoint`: the recorded settings replace the config's `model.*` (Lightning's behaviour), each replaced
  setting logged.

Settings are compared as plain data (the mappings `LongContextLM` records as its hyper-parameters); a setting one
side does not record (added in a later version) is not compared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolong_lit.checkpoint import DCP_META_FILE, torch_load
from prolong_lit.errors import CheckpointError

log = logging.getLogger(__name__)

RESUME_SETTINGS = ("config", "checkpoint")
# model settings a resume cannot change under `config`: they change what the saved weights mean
FIXED_ON_RESUME = ("class_path", "llama", "seq_len")
HPARAMS_KEY = "hyper_parameters"


@dataclass(frozen=True)
class Difference:
    """One model setting (dotted, as on the command line: `model.optimizer.init_args.lr`) that differs."""

    setting: str
    recorded: Any
    configured: Any

    @property
    def fixed_on_resume(self) -> bool:
        return self.setting.split(".")[1] in FIXED_ON_RESUME

    def __str__(self) -> str:
        return f"{self.setting}: {self.recorded!r} in the checkpoint, {self.configured!r} in the config"


def recorded_model_settings(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The `model.*` settings a checkpoint recorded, as a config writes them (`class_path` + `init_args`), or
    None when it recorded none (a module without saved hyper-parameters).

    `ckpt_path` is a single-file Lightning checkpoint or a distributed-checkpoint directory (its `meta.pt` holds
    the hyper-parameters). Anything else is a CheckpointError naming `--ckpt_path`.
    """
    path = Path(ckpt_path)
    if not path.exists():
        raise CheckpointError(f"--ckpt_path: {str(path)!r} does not exist")
    file = path / DCP_META_FILE if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise CheckpointError(
            f"--ckpt_path: {str(path)!r} is a directory but not a distributed checkpoint (no {DCP_META_FILE}); "
            "give a .ckpt file or a checkpoint directory a sharded (FSDP2) run saved"
        )
    try:
        checkpoint = torch_load(file)
    except Exception as err:  # a truncated zip, a text file, a pickle of something else
        raise CheckpointError(
            f"--ckpt_path: {str(file)!r} cannot be read as a checkpoint (truncated or not a checkpoint?): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(checkpoint, Mapping) or not {"global_step", "loops"} <= checkpoint.keys():
        raise CheckpointError(
            f"--ckpt_path: {str(file)!r} is not a Lightning training checkpoint (no 'global_step'/'loops' entries: "
            "a bare state dict or a Hugging Face weights file?); to start training from weights, set "
            "model.init_args.llama.name_or_path instead"
        )
    hparams = dict(checkpoint.get(HPARAMS_KEY) or {})
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    if not hparams:
        return None
    return {"class_path": class_path, "init_args": hparams} if class_path else {"init_args": hparams}


def differences(recorded: Mapping[str, Any], configured: Mapping[str, Any], prefix: str = "model") -> list[Difference]:
    """Every leaf setting present on both sides whose values differ (sequences compare as lists; `init_args`
    of a component compare only when its class_path is the same)."""
    found: list[Difference] = []
    for key in recorded.keys() & configured.keys():
        theirs, ours, setting = recorded[key], configured[key], f"{prefix}.{key}"
        if isinstance(theirs, Mapping) and isinstance(ours, Mapping):
            if theirs.get("class_path", None) != ours.get("class_path", None):
                found.append(Difference(setting, _plain(theirs), _plain(ours)))
            else:
                found.extend(differences(theirs, ours, setting))
        elif not _equal(theirs, ours):
            found.append(Difference(setting, _plain(theirs), _plain(ours)))
    return sorted(found, key=lambda d: d.setting)


def check_resume(recorded: Mapping[str, Any] | None, configured: Mapping[str, Any], policy: str,
                 ckpt_path: str | Path) -> list[Difference]:
    """The differences between the checkpoint's and the config's model settings, after applying `policy`
    (`--resume_settings`): refused (CheckpointError naming each fixed setting) or logged one by one."""
    if policy not in RESUME_SETTINGS:
        raise CheckpointError(f"--resume_settings must be one of {list(RESUME_SETTINGS)}, got {policy!r}")
    if recorded is None:
        return []
    found = model_differences(recorded, configured)
    if policy == "checkpoint":
        for difference in found:
            log.warning("resume keeps the checkpoint's %s = %r (the config says %r; --resume_settings checkpoint)",
                        difference.setting, difference.recorded, difference.configured)
        return found
    fixed = [d for d in found if d.fixed_on_resume]
    if fixed:
        raise CheckpointError(
            f"--ckpt_path {str(ckpt_path)!r}: the config's model differs from the checkpoint's, so it cannot resume "
            "it: " + "; ".join(map(str, fixed)) + ". Use the checkpoint's values, or --resume_settings checkpoint to "
            "keep every recorded model setting, or start a new run from these weights instead of resuming"
        )
    for difference in found:
        log.warning("resume applies the config's %s = %r from the resumed step on (the checkpoint recorded %r)",
                    difference.setting, difference.configured, difference.recorded)
    return found


def model_differences(recorded: Mapping[str, Any], configured: Mapping[str, Any]) -> list[Difference]:
    """The differing settings of two `model` configs (`{class_path, init_args}`), named `model.llama.x`."""
    return differences(_with_layer_names(recorded), _with_layer_names(configured))


def _with_layer_names(settings: Mapping[str, Any]) -> dict[str, Any]:
    """`{class_path, init_args: {...}}` -> `{class_path, ...init_args}`, so differences read `model.llama.x`."""
    flat = dict(settings.get("init_args") or {})
    if settings.get("class_path") is not None:
        flat["class_path"] = settings["class_path"]
    for key, value in list(flat.items()):  # components: {class_path, init_args} -> flat as well, keeping class_path
        if isinstance(value, Mapping) and "init_args" in value:
            flat[key] = {"class_path": value.get("class_path"), "init_args": dict(value.get("init_args") or {})}
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _equal(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b
