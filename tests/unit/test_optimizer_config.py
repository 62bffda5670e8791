"""The optimizer and the learning-rate schedule are components: swapped by config alone, with the recipe's
defaults when a config names neither."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from prolong_lit.model.optim import AdamW, WarmupCosine
from prolong_lit.trainer_cli import ProLongCLI

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs/demo/pretrain.yaml"


def configured_optimizer(args: list[str], tmp_path: Path):
    """Build the run the CLI would (nothing trained) and return (module, optimizer, scheduler) as Lightning gets
    them: configure_model, the trainer attached, configure_optimizers."""
    cli = ProLongCLI(args=[*args, f"--trainer.default_root_dir={tmp_path}"], run=False)
    module = cli.model
    module.configure_model()
    module.trainer = cli.trainer  # how Lightning attaches the trainer before configure_optimizers
    configured = module.configure_optimizers()
    assert configured["lr_scheduler"]["interval"] == "step"
    return module, configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def group_names(module, optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in module.model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def test_optimizer_is_swapped_by_config_alone(tmp_path):
    module, optimizer, scheduler = configured_optimizer(
        ["--config", str(DEMO), "--model.init_args.optimizer=torch.optim.SGD",
         "--model.init_args.optimizer.init_args.lr=0.1", "--model.init_args.optimizer.init_args.weight_decay=0.01"],
        tmp_path,
    )
    assert type(optimizer) is torch.optim.SGD
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)  # SGD's configured decay on matrices
    decay_names, no_decay_names = group_names(module, optimizer)
    assert no_decay_names == {n for n, _ in module.model.named_parameters() if "norm" in n}
    assert "lm_head.weight" in decay_names
    # the demo's schedule still drives it: warmup from 0 to SGD's lr
    assert isinstance(scheduler, WarmupCosine)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.1]
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]


def test_schedule_is_swapped_by_config_alone(tmp_path):
    _, optimizer, scheduler = configured_optimizer(
        ["--config", str(DEMO), "--model.init_args.scheduler=torch.optim.lr_scheduler.PolynomialLR",
         "--model.init_args.scheduler.init_args.power=2.0"],
        tmp_path,
    )
    # PolynomialLR(optimizer, total_iters, power): called with the demo's trainer.max_steps
    assert type(scheduler) is torch.optim.lr_scheduler.PolynomialLR
    assert (scheduler.total_iters, scheduler.power) == (30, 2.0)
    assert type(optimizer) is AdamW and optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)  # no warmup now
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * (1 - 1 / 30) ** 2)


def test_default_is_the_recipe_adamw_with_warmup_cosine(tmp_path):
    demo = yaml.safe_load(DEMO.read_text())
    for key in ("optimizer", "scheduler"):
        del demo["model"]["init_args"][key]
    config = tmp_path / "no-optimizer.yaml"
    config.write_text(yaml.safe_dump(demo))
    module, optimizer, scheduler = configured_optimizer(["--config", str(config)], tmp_path)
    assert type(optimizer) is AdamW and isinstance(scheduler, WarmupCosine)
    decay, no_decay = optimizer.param_groups
    assert decay["initial_lr"] == 1e-5 and decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert group_names(module, optimizer)[1] == {n for n, _ in module.model.named_parameters() if "norm" in n}
    lrs = []
    for _ in range(31):  # the demo's 30 steps: warmup ceil(0.1 * 30) = 3 steps, then cosine to 10%
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-5 / 3) and lrs[3] == pytest.approx(1e-5)
    assert lrs[30] == pytest.approx(1e-6)
