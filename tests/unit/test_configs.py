"""Every YAML in configs/ and callbacks/ parses; the demo ones instantiate."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from prolong_lit.cli import ProLongCLI
from prolong_lit.commands.prepare import parse_config
from prolong_lit.data.prepare import PrepareConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
CALLBACK_BUNDLES = sorted((REPO / "callbacks").glob("*.yaml"))


def is_data_spec(path: Path) -> bool:
    return path.parent.name == "data"


def is_pipeline(path: Path) -> bool:
    return "phases" in (yaml.safe_load(path.read_text()) or {})


def test_configs_exist():
    names = {p.relative_to(REPO).as_posix() for p in CONFIGS}
    assert {"configs/demo/pretrain.yaml", "configs/data/demo.yaml"} <= names


@pytest.mark.parametrize("path", [p for p in CONFIGS if is_data_spec(p)], ids=lambda p: p.name)
def test_data_spec_parses(path):
    config, overwrite = parse_config(["--config", str(path)])
    assert isinstance(config, PrepareConfig) and config.seq_len > 0 and config.domains
    assert overwrite is False


def print_config(args: list[str]) -> dict:
    """Parse (types and class paths checked, nothing instantiated) and return the resolved config."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        ProLongCLI(args=["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if not is_data_spec(p) and not is_pipeline(p)], ids=lambda p: p.name
)
def test_fit_config_parses(path):
    config = print_config(["--config", str(path)])
    assert config["model"]["class_path"] and config["data"]["class_path"]
    # the model trains at the length the data was packed to (interpolated in the YAML)
    assert config["model"]["init_args"]["seq_len"] == config["data"]["init_args"]["seq_len"]


@pytest.mark.parametrize("path", CALLBACK_BUNDLES, ids=lambda p: p.name)
def test_callback_bundle_parses_on_top_of_the_demo(path):
    config = print_config(["--config", str(REPO / "configs/demo/pretrain.yaml"), "--config", str(path)])
    assert config["trainer"]["callbacks"]


def test_demo_config_instantiates():
    cli = ProLongCLI(args=["--config", str(REPO / "configs/demo/pretrain.yaml")], run=False)
    assert type(cli.model).__name__ == "LongContextLM"
    assert type(cli.datamodule).__name__ == "MixtureDataModule"
    assert cli.trainer.max_steps > 0 and cli.model.hparams.seq_len == cli.datamodule.seq_len
    assert cli.datamodule.domains == ["code_repos", "docstrings", "prose"]  # the domains configs/data/demo.yaml builds
