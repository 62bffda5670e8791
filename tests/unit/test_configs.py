"""Every YAML in configs/ and callbacks/ parses, fit configs in the combinations that are run (a base alone or
with one delta file, as the pipelines list them); the demo instantiates, its files under its root directory."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from prolong_lit.data.prepare import PrepareConfig, parse_config
from prolong_lit.pipeline.config import load_pipeline_config
from prolong_lit.trainer_cli import ProLongCLI

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
CALLBACK_BUNDLES = sorted((REPO / "callbacks").glob("*.yaml"))
DEMO = "configs/demo/pretrain.yaml"
RECIPE_BASE = "configs/prolong-8b/base.yaml"
# every fit run the repository documents: `fit --config <file> [--config <file>]`, files merged in order
FIT_RUNS = {
    "demo": [DEMO],
    "demo-fsdp": [DEMO, "configs/demo/pretrain-fsdp.yaml"],
    "demo-sft": [DEMO, "configs/demo/sft.yaml"],
    "prolong-8b-stage1-64k": [RECIPE_BASE, "configs/prolong-8b/stage1-64k.yaml"],
    "prolong-8b-stage2-512k": [RECIPE_BASE, "configs/prolong-8b/stage2-512k.yaml"],
    "prolong-8b-sft": [RECIPE_BASE, "configs/prolong-8b/sft.yaml"],
}


def is_data_spec(path: Path) -> bool:
    return path.parent.name == "data"


def is_pipeline(path: Path) -> bool:
    return "phases" in (yaml.safe_load(path.read_text()) or {})


def test_configs_exist():
    names = {p.relative_to(REPO).as_posix() for p in CONFIGS}
    assert {"configs/demo/pretrain.yaml", "configs/data/demo.yaml"} <= names
    # the data specs of ProLong's released data, parsed below like every data spec (no data needed to parse)
    assert {f"configs/data/{n}-mds.yaml" for n in ("prolong-64k", "prolong-512k", "ultrachat")} <= names


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


def config_args(files: list[str]) -> list[str]:
    return [arg for file in files for arg in ("--config", str(REPO / file))]


def test_every_fit_config_is_in_a_tested_run():
    fit_files = {p.relative_to(REPO).as_posix() for p in CONFIGS if not is_data_spec(p) and not is_pipeline(p)}
    assert fit_files == {file for files in FIT_RUNS.values() for file in files}


@pytest.mark.parametrize("files", FIT_RUNS.values(), ids=FIT_RUNS.keys())
def test_fit_config_parses(files):
    config = print_config(config_args(files))
    assert config["model"]["class_path"] and config["data"]["class_path"]
    # the model trains at the length the data was packed to: no config sets model.seq_len, which then follows
    # data.seq_len at set-up (test_demo_config_instantiates)
    assert config["model"]["init_args"]["seq_len"] is None


@pytest.mark.parametrize("path", [p for p in CONFIGS if is_pipeline(p)], ids=lambda p: p.parent.name)
def test_pipeline_phases_are_tested_runs(path, monkeypatch):
    """Every phase of a pipeline file merges one of the combinations parsed above (each phase's complete
    config, overrides included, is parsed in test_recipe_configs.py)."""
    monkeypatch.chdir(REPO)  # pipeline files name configs relative to the repository
    config = load_pipeline_config(path)
    for phase in config.phases:
        assert phase.config in FIT_RUNS.values(), phase.name


@pytest.mark.parametrize("path", CALLBACK_BUNDLES, ids=lambda p: p.name)
def test_callback_bundle_parses_on_top_of_the_demo(path):
    config = print_config(["--config", str(REPO / "configs/demo/pretrain.yaml"), "--config", str(path)])
    assert config["trainer"]["callbacks"]


def test_demo_config_instantiates():
    cli = ProLongCLI(args=["--config", str(REPO / "configs/demo/pretrain.yaml")], run=False)
    assert type(cli.model).__name__ == "LongContextLM"
    assert type(cli.datamodule).__name__ == "MixtureDataModule"
    assert cli.trainer.max_steps > 0 and cli.model.seq_len is None  # follows the DataModule's at set-up:
    cli.model.trainer = cli.trainer
    cli.trainer.datamodule = cli.datamodule
    cli.model.setup("fit")
    assert cli.model.seq_len == cli.datamodule.seq_len == 2048
    assert cli.datamodule.domains == ["code_repos", "docstrings", "prose"]  # the domains configs/data/demo.yaml builds


def test_default_root_dir_moves_logs_and_checkpoints(tmp_path, monkeypatch):
    """--trainer.default_root_dir=X puts the demo's logs in X/logs and its checkpoints in X/checkpoints; two
    roots, two checkpoint folders. Unset, the demo's own root (relative to the working directory) holds both."""
    tmp_path = tmp_path.resolve()  # checkpoint folders are real paths
    monkeypatch.chdir(tmp_path)
    checkpoints = {}
    for name in ("first", "second"):
        root = tmp_path / name
        cli = ProLongCLI(args=["--config", str(REPO / DEMO), f"--trainer.default_root_dir={root}"], run=False)
        assert Path(cli.trainer.log_dir).resolve() == root / "logs"
        assert Path(cli.trainer.checkpoint_callback.dirpath) == root / "checkpoints"
        checkpoints[name] = cli.trainer.checkpoint_callback.dirpath
    assert checkpoints["first"] != checkpoints["second"]
    cli = ProLongCLI(args=["--config", str(REPO / DEMO)], run=False)
    demo_root = tmp_path / yaml.safe_load((REPO / DEMO).read_text())["trainer"]["default_root_dir"]
    assert Path(cli.trainer.log_dir).resolve() == demo_root / "logs"
    assert Path(cli.trainer.checkpoint_callback.dirpath) == demo_root / "checkpoints"
