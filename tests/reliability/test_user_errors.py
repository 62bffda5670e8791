"""A user's mistake ends as one line, `error: <message naming the setting or file>`, and exit status 2.

Each case runs `prolong_lit.cli.main` in process (the function `python -m prolong_lit` calls), so the suite stays
fast; `test_the_command_line_itself` runs two through a real subprocess. Every case also checks that the run
directory is unchanged (nothing written before the refusal) and that `PROLONG_LIT_DEBUG=1` brings the traceback
back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prolong_lit.cli import main
from prolong_lit.errors import DEBUG_ENV, UserError
from tests.helpers.data_factory import write_prepared
from tests.helpers.run_helpers import DOMAINS, SEQ_LEN, demo_config

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    """(tmp dir, the demo config pointed at tiny prepared data, as a dict)."""
    tmp = tmp_path_factory.mktemp("user_errors")
    write_prepared(tmp / "data", DOMAINS, seq_len=SEQ_LEN)
    return tmp, yaml.safe_load(demo_config(tmp, tmp / "data", "run", max_steps=2).read_text())


def _set(config: dict, dotted: str, value) -> dict:
    """A deep copy of `config` with `dotted` (e.g. model.init_args.llama.name_or_path) set to `value`."""
    config = yaml.safe_load(yaml.safe_dump(config))
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refusal(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    # the message from its `error:` line on (a parser's own error may add indented detail lines)
    return err[err.index(lines[0]):]


FIT_CASES = {
    "unknown size": ("model.init_args.llama.name_or_path", "llama-9000", "model.llama.name_or_path: 'llama-9000'"),
    "unknown override": ("model.init_args.llama.overrides", {"num_layerz": 2}, "model.llama.overrides: 'num_layerz'"),
    "rope field as override": ("model.init_args.llama.overrides", {"rope_theta": 1.0}, "model.llama.rope_theta"),
    "min_lr_ratio": ("model.init_args.scheduler.init_args.min_lr_ratio", 2.0, "model.scheduler.min_lr_ratio"),
    "warmup_ratio": ("model.init_args.scheduler.init_args.warmup_ratio", -1.0, "model.scheduler.warmup_ratio"),
    "no max_steps": ("trainer.max_steps", -1, "trainer.max_steps must be set"),
    "unknown component": ("model.init_args.optimizer", {"class_path": "torch.optim.Adamz"}, "torch.optim.Adamz"),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_refuses_a_bad_setting_in_one_line(base, tmp_path, capsys, case):
    tmp, config = base
    dotted, value, expected = FIT_CASES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(config, dotted, value)))
    root = Path(config["trainer"]["default_root_dir"])
    before = _snapshot(root) if root.exists() else {}
    message = _refusal(["fit", "--config", str(bad)], capsys)
    assert expected in message, message
    assert (_snapshot(root) if root.exists() else {}) == before


def _checkpoint(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "run.ckpt"
    torch.save(content, path)
    return path


EXPORT_CASES = {
    "missing checkpoint": (lambda tmp: ["--checkpoint", str(tmp / "missing.ckpt")], "--checkpoint: "),
    "not ours": (lambda tmp: ["--checkpoint", str(_checkpoint(tmp, {"weight": torch.zeros(1)}))],
                 "is not a prolong_lit checkpoint"),
    "truncated": (lambda tmp: ["--checkpoint", str(_truncated(tmp))], "is not a readable checkpoint"),
    "bad dtype": (lambda tmp: ["--checkpoint", str(tmp / "x.ckpt"), "--dtype", "int3"],
                  "--dtype: invalid choice: 'int3'"),
    "output in the way": (lambda tmp: ["--checkpoint", str(tmp / "x.ckpt"), "--output", str(_occupied(tmp))],
                          "--output: "),
}


def _truncated(tmp: Path) -> Path:
    whole = _checkpoint(tmp, {"hf_config": {}, "state_dict": {"w": torch.zeros(1000)}}).read_bytes()
    path = tmp / "truncated.ckpt"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _occupied(tmp: Path) -> Path:
    path = tmp / "occupied"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_refuses_in_one_line(tmp_path, capsys, case):
    make_args, expected = EXPORT_CASES[case]
    args = make_args(tmp_path)
    if "--output" not in args:
        args += ["--output", str(tmp_path / "export")]
    before = _snapshot(tmp_path)
    message = _refusal(["export", *args], capsys)
    assert expected in message, message
    assert _snapshot(tmp_path) == before


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError, match="--checkpoint: "):
        main(["export", "--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "out")])


def test_the_command_line_itself(base, tmp_path):
    """Through `python -m prolong_lit`: status 2, one `error:` line, no traceback; with PROLONG_LIT_DEBUG=1 the
    traceback; a bug (not a user error) keeps its traceback and is not status 2."""
    tmp, config = base
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(config, "model.init_args.llama.name_or_path", "llama-9000")))

    def run(*args, **env):
        return subprocess.run([sys.executable, "-m", "prolong_lit", *args], capture_output=True, text=True,
                              timeout=180, env={**_environ(), **env})

    done = run("fit", "--config", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "error: model.llama.name_or_path: 'llama-9000'" in done.stderr
    debug = run("export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "o"),
                **{DEBUG_ENV: "1"})
    assert debug.returncode != 2 and "Traceback" in debug.stderr and "MissingPathError" in debug.stderr


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
