"""Carry AdamW's moments from one phase's checkpoint into the next phase (ProLong's 64K -> 512K hand-off).

ProLong's stage 2 starts from the 64K run's weights AND its AdamW state, but not its trainer state: the
learning-rate schedule restarts with a new warmup and the step count restarts at 0 (their README: move
`trainer_state.json` away and symlink the last `optimizer.pt`). `CarryOptimizerState` does that here:

- In every checkpoint it records the names of the parameters the optimizer holds, group by group in the
  optimizer's order (`optimizer_param_names`), so the saved per-parameter state can later be matched by NAME,
  whatever the checkpoint's key style (a single file keys it by position, a distributed one by name).
- Given `checkpoint=`, at fit start it copies that checkpoint's per-parameter optimizer state (AdamW: exp_avg,
  exp_avg_sq, and its per-parameter `step`, whose bias correction would otherwise inflate the first updates
  ~10x) into the freshly built optimizer. The param groups' hyper-parameters (lr, betas, weight decay) and the
  LR scheduler stay the new phase's own: the schedule starts at its warmup and trainer.global_step at 0.
  Parameters that do not match by name and shape stop the run with an error before the first step.
- A phase resumed from its own checkpoint (`--ckpt_path`) restores its own optimizer state: nothing is carried.

Sharded (FSDP2 / DTensor) parameters get state laid out like them: from a distributed checkpoint each rank
loads only its shards (torch.distributed.checkpoint); from a single file each rank takes its slice of the
memory-mapped tensors.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from prolong_lit.checkpoint import DCP_META_FILE, PARAM_NAMES_KEY, parameter_name, torch_load
from prolong_lit.errors import CheckpointError, MissingPathError

log = logging.getLogger(__name__)

DCP_OPTIMIZER_KEY = "optimizer_0"  # Lightning's distributed checkpoints store optimizer i under optimizer_<i>


def optimizer_param_names(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> list[list[str]]:
    """The (unwrapped) names of the optimizer's parameters, per param group, in the optimizer's order."""
    names = {id(param): parameter_name(name) for name, param in module.named_parameters()}
    if any(id(p) not in names for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer holds parameters that are not the LightningModule's own; cannot name them")
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


# ---- reading a checkpoint's optimizer state ----------------------------------------------------------------


def saved_state_shapes(checkpoint: str | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Parameter name -> {state key -> shape} of the optimizer state saved in `checkpoint` (nothing loaded)."""
    path = Path(checkpoint)
    if path.is_dir():
        return {name: {key: shape for key, (shape, _) in fields.items()} for name, (_, fields) in
                _dcp_layout(path).items()}
    return _shapes(_file_state(path))


def _shapes(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: {key: tuple(value.shape) for key, value in fields.items() if torch.is_tensor(value)}
            for name, fields in state.items()}


def _file_state(path: Path) -> dict[str, dict[str, Any]]:
    """Parameter name -> its saved state (memory-mapped tensors) of a single-file Lightning checkpoint."""
    if not path.is_file():
        raise MissingPathError(f"carry_optimizer: the checkpoint {str(path)!r} does not exist")
    checkpoint = torch_load(path)  # memory-mapped: only the optimizer state is read, as it is used
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1:
        raise CheckpointError(
            f"carry_optimizer: {str(path)!r} holds {len(states)} optimizer states; carrying needs exactly one "
            "(a checkpoint saved during training, not a weights-only one)"
        )
    groups, state = states[0]["param_groups"], states[0]["state"]
    names = checkpoint.get(PARAM_NAMES_KEY)
    if names is None:
        if state and all(isinstance(key, str) for key in state):  # already keyed by parameter name
            return {parameter_name(key): value for key, value in state.items()}
        raise CheckpointError(
            f"carry_optimizer: {str(path)!r} does not record its optimizer's parameter names ({PARAM_NAMES_KEY!r}); "
            "it was saved without the CarryOptimizerState callback (the pipeline adds it to every phase)"
        )
    if [len(group["params"]) for group in groups] != [len(group) for group in names]:
        raise CheckpointError(f"carry_optimizer: {str(path)!r}: its {PARAM_NAMES_KEY!r} do not fit its param groups")
    return {name: state.get(key, {}) for group, group_names in zip(groups, names)
            for key, name in zip(group["params"], group_names)}


def _dcp_layout(path: Path) -> dict[str, tuple[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]]:
    """Parameter name -> (its key in the checkpoint, {state key -> (shape, dtype)}) of a distributed checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / DCP_META_FILE).is_file():
        raise CheckpointError(
            f"carry_optimizer: {str(path)!r} is a directory but not a Lightning distributed checkpoint"
        )
    metadata = FileSystemReader(str(path)).read_metadata()
    layout: dict[str, tuple[str, dict]] = {}
    for key, item in metadata.state_dict_metadata.items():
        where = (metadata.planner_data or {}).get(key, ())
        # ("optimizer_0", "state", "<parameter name>", "exp_avg"): see get_optimizer_state_dict's layout
        if len(where) == 4 and where[:2] == (DCP_OPTIMIZER_KEY, "state") and isinstance(item, TensorStorageMetadata):
            entry = layout.setdefault(parameter_name(where[2]), (where[2], {}))
            entry[1][where[3]] = (tuple(item.size), item.properties.dtype)
    if not layout:
        raise CheckpointError(f"carry_optimizer: the distributed checkpoint {str(path)!r} holds no optimizer state")
    return layout


# ---- matching and laying out ---------------------------------------------------------------------------------


def check_state_matches(
    saved: dict[str, dict[str, tuple[int, ...]]], params: dict[str, torch.nn.Parameter], checkpoint: str | Path
) -> None:
    """Raise a clear error unless every parameter of the new optimizer has a saved state of its shape and the
    checkpoint holds no state for parameters this optimizer does not have."""
    missing = sorted(set(params) - set(saved))
    extra = sorted(set(saved) - set(params))
    wrong = [
        f"{name}: {key} {shape} saved, parameter {tuple(params[name].shape)} here"
        for name in sorted(set(params) & set(saved))
        for key, shape in saved[name].items()
        if len(shape) > 0 and shape != tuple(params[name].shape)  # 0-d entries (AdamW's step) fit any parameter
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameters of this phase have no saved state (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} saved parameters are not in this phase's optimizer (e.g. {extra[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} shapes differ (e.g. {wrong[:3]})")
        raise CheckpointError(
            f"carry_optimizer: the optimizer state of {str(checkpoint)!r} does not match this phase's parameters: "
            + "; ".join(parts) + ". Carry moments only between phases of the same model (same model_overrides)."
        )


def _laid_out_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a saved tensor of the parameter's global shape) as a tensor laid out like `param`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(dtype=param.dtype)
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank takes its own slice of the (memory-mapped) tensor, no communication
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full.to(device=param.device, copy=True)


def load_saved_state(checkpoint: str | Path, params: dict[str, torch.nn.Parameter]) -> dict[str, dict[str, Any]]:
    """Parameter name -> its optimizer state from `checkpoint`, checked against `params` (name -> parameter) and
    laid out like each parameter (device, dtype, sharding). 0-d entries (AdamW's `step`) are kept as saved."""
    path = Path(checkpoint)
    if path.is_dir():
        check_state_matches(saved_state_shapes(path), params, path)
        return _load_dcp_state(path, params)
    saved = _file_state(path)
    check_state_matches(_shapes(saved), params, path)
    return {
        name: {key: _laid_out_like(params[name], value) if torch.is_tensor(value) and value.ndim > 0
               else (value.clone() if torch.is_tensor(value) else value) for key, value in saved[name].items()}
        for name in params
    }


def _load_dcp_state(path: Path, params: dict[str, torch.nn.Parameter]) -> dict[str, dict[str, Any]]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    layout = _dcp_layout(path)
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in params.items():
        targets[layout[name][0]] = {
            # an empty tensor like the parameter (a DTensor shard under FSDP2): each rank reads only its part
            key: torch.empty_like(param, dtype=dtype) if len(shape) > 0 else torch.zeros((), dtype=dtype)
            for key, (shape, dtype) in layout[name][1].items()
        }
    state = {DCP_OPTIMIZER_KEY: {"state": targets}}
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # "no process group: loading in a single process" is then the intent
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=single)
    return {name: {key: value.to(dtype=param.dtype) if value.ndim > 0 else value
                   for key, value in targets[layout[name][0]].items()} for name, param in params.items()}


# ---- the callback --------------------------------------------------------------------------------------------


class CarryOptimizerState(Callback):
    """Records the optimizer's parameter names in every checkpoint; with `checkpoint`, starts this run's optimizer
    from that checkpoint's per-parameter state while the LR schedule and step count start fresh."""

    def __init__(self, checkpoint: str | None = None) -> None:
        """
        Args:
            checkpoint: a checkpoint of the previous phase (single file or distributed directory) whose optimizer
                state to carry over; None only records parameter names (every phase of a pipeline does, so the
                next phase can carry from it).
        """
        self.checkpoint = checkpoint

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The optimizer exists here (strategy.setup) and a --ckpt_path has not been restored yet.
        if self.checkpoint is None:
            return
        if trainer.ckpt_path is not None:
            log.info("resuming from %s: its own optimizer state is restored, nothing carried", trainer.ckpt_path)
            return
        if len(trainer.optimizers) != 1:
            raise CheckpointError(f"carry_optimizer: the run has {len(trainer.optimizers)} optimizers; it needs one")
        optimizer = trainer.optimizers[0]
        names = optimizer_param_names(optimizer, pl_module)
        params = {name: p for group, group_names in zip(optimizer.param_groups, names)
                  for p, name in zip(group["params"], group_names)}
        carried = load_saved_state(self.checkpoint, params)
        counts: dict[str, int] = defaultdict(int)
        for name, param in params.items():
            if carried[name]:
                optimizer.state[param] = carried[name]
                counts["carried"] += 1
            else:
                counts["no saved state (never updated)"] += 1
        log.info("carried the optimizer state of %s into a fresh schedule at step 0: %s", self.checkpoint,
                 dict(counts))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if len(trainer.optimizers) == 1:
            checkpoint[PARAM_NAMES_KEY] = optimizer_param_names(trainer.optimizers[0], pl_module)
