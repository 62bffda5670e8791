# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The demo and the tests use the real Llama-3 tokenizer, built offline into this cache.
export PROLONG_LIT_CACHE ?= $(CURDIR)/.cache/prolong_lit

.PHONY: venv tokenizer demo demo-data demo-train demo-pipeline test test-fast test-slurm lint clean gpu-wheels

# pip would otherwise replace the local CPU torch wheel by a 3 GB CUDA build (constraints.txt);
# litdata drags in a CUDA torchvision that breaks `import lightning` beside a CPU torch, so it goes.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip uninstall -y -q torchvision || true
	touch $@

venv: $(VENV)/.installed

tokenizer: venv
	$(PY) -m prolong_lit tokenizer --output $(PROLONG_LIT_CACHE)/llama3-tokenizer

# The demo corpus (configs/data/demo.yaml); built once, and again (--overwrite) when that config changes.
data/demo/manifest.json: configs/data/demo.yaml | tokenizer
	$(PY) -m prolong_lit prepare --config configs/data/demo.yaml $(if $(wildcard $@),--overwrite)

demo-data: data/demo/manifest.json

# The pretraining demo alone: `fit` on configs/demo/pretrain.yaml (runs/demo/pretrain).
demo-train: demo-data
	$(PY) -m prolong_lit fit --config configs/demo/pretrain.yaml

# The three phases on the demo corpus: stage1 = the pretraining demo (configs/demo/pretrain.yaml as it is),
# stage2 = twice the length with a larger RoPE base and stage1's AdamW moments, then SFT; evaluations and Hugging
# Face exports between them, runs/demo-pipeline/summary.md at the end. A rerun skips finished phases (and resumes
# an interrupted one): `rm -rf runs/demo-pipeline` to train again.
demo: demo-data
	$(PY) -m prolong_lit pipeline --config configs/demo/pipeline.yaml

demo-pipeline: demo

# The Slurm test needs a running cluster: `make test-slurm` brings one up and runs it.
test: tokenizer
	$(PY) -m pytest -q -m "not slurm" tests

test-fast: tokenizer
	$(PY) -m pytest -q -m "not slow and not slurm" tests

# A real Slurm of 2 emulated nodes on this machine (root; installs slurm-wlm and munge when missing): the sbatch
# template trains the demo with FSDP2 across 2 nodes; SIGUSR1 -> checkpoint -> requeue -> exact resume.
# The cluster goes down even when the test fails or is interrupted.
test-slurm: tokenizer
	trap 'scripts/slurm/local_cluster.sh down' EXIT INT TERM; \
	scripts/slurm/local_cluster.sh up && \
	SLURM_CONF=$$(scripts/slurm/local_cluster.sh conf) PROLONG_LIT_REQUIRE_SLURM=1 $(PY) -m pytest -q tests/slurm

# Wheels for the GPU machine (Python 3.12, torch 2.11+cu130, no registry), into the ignored .whl/ folder, which a
# device run must carry (README.md, GPU). Default: liger-kernel. flash-attn-4's set (FA4_WHEELS) is ~190 MiB: its
# CuTe DSL compiler libraries are ~88 MiB a wheel (cu12, needed by every release, + cu13), over the 64 MiB carry:
# `make gpu-wheels GPU_WHEELS="$(FA4_WHEELS)" WHEEL_BUDGET_MIB=256` where more can travel.
WHEEL_DIR := .whl
WHEEL_BUDGET_MIB ?= 64
GPU_WHEELS ?= liger-kernel
FA4_WHEELS := flash-attn-4>=4.0.0b36 nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base nvidia-cutlass-dsl-libs-cu12 \
	nvidia-cutlass-dsl-libs-cu13 quack-kernels apache-tvm-ffi torch-c-dlpack-ext einops
PIP_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))  # pip download needs no project venv
gpu-wheels:
	mkdir -p $(WHEEL_DIR)
	for pkg in $(GPU_WHEELS); do \
	  $(PIP_PY) -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d $(WHEEL_DIR) "$$pkg" \
	    || exit 1; \
	done
	@$(PIP_PY) -c 'import pathlib, sys; files = sorted(pathlib.Path("$(WHEEL_DIR)").glob("*.whl")); \
	[print(f"{f.stat().st_size / 2**20:8.1f} MiB  {f.name}") for f in files]; \
	total = sum(f.stat().st_size for f in files) / 2**20; \
	print(f"{total:8.1f} MiB  in $(WHEEL_DIR) (budget $(WHEEL_BUDGET_MIB) MiB)"); \
	sys.exit("over the wheel budget: remove some from $(WHEEL_DIR)" if total > $(WHEEL_BUDGET_MIB) else 0)'

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs data/demo data/demo-4k data/demo-sft .cache
