"""`benchmarks/gpu/check.py --cpu-smoke`: the GPU check's code path on CPU (docmask only, tiny shapes), in a process
where litdata, jsonargparse and omegaconf cannot be imported, as on the GPU machine. It must write both tables,
with every section run and passing, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MISSING_ON_GPU_MACHINE = ("litdata", "jsonargparse", "omegaconf")

# Runs check.py's main with a meta-path finder that refuses the packages the GPU image lacks (ModuleNotFoundError, as
# for a package that is not installed: lightning probes optional packages with find_spec and expects exactly that).
RUNNER = f"""
import runpy, sys
BLOCKED = {MISSING_ON_GPU_MACHINE!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is not installed on the GPU machine", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["check.py", *sys.argv[1:]]
try:
    runpy.run_path({str(ROOT / "benchmarks" / "gpu" / "check.py")!r}, run_name="__main__")
finally:
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "a blocked package was imported"
"""


def test_check_cpu_smoke_writes_every_table_without_gpu_image_missing_packages(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", RUNNER, "--cpu-smoke", "--out", str(out), "--steps", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "check.json").read_text())
    assert report["ok"] is True
    sections = report["sections"]
    assert len(sections) == 5 and all(s["status"] == "ok" for s in sections.values()), sections
    parity = next(s for name, s in sections.items() if name.startswith("1."))
    (row,) = parity["rows"]
    assert row["kernel"] == "docmask" and row["pass"] is True
    assert row["others_out_change"] == 0.0 and row["victim_out_change"] > 0.1  # isolation measured, not assumed
    model = next(s for name, s in sections.items() if name.startswith("2."))
    assert model["rows"][0]["kernel"] == "sdpa" and model["rows"][0]["grad_rel_l2"] > 0  # two different paths
    throughput = next(s for name, s in sections.items() if name.startswith("4."))
    assert [r["seq_len"] for r in throughput["rows"]] == [128, 256]
    assert all(r["tokens_per_s"] > 0 for r in throughput["rows"])
    extrapolated = next(s for name, s in sections.items() if name.startswith("5."))
    assert [r["layers"] for r in extrapolated["rows"]] == [2, 4, "32 (extrapolated)"]
    markdown = (out / "check.md").read_text()
    assert markdown.count("\n## ") == 5 and "| docmask |" in markdown
    assert report["environment"]["auto_picks"] == "docmask"


def test_gpu_tests_collect_without_the_packages_the_gpu_image_lacks():
    """tests/gpu/ must collect on the GPU machine (no litdata, jsonargparse, omegaconf): collected here with them
    blocked; the `gpu` marker then skips every test on this CPU machine."""
    collect = RUNNER.split("sys.argv =")[0] + (
        "import pytest\n"
        "rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/gpu'])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED], 'a blocked package was imported'\n"
        "sys.exit(int(rc))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", collect], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "test_fsdp_gpu.py::" in result.stdout and "test_attention_kernels_gpu.py::" in result.stdout
