"""The recipe configs carry the paper's numbers, and every pipeline file parses.

The numbers (docs/recipe.md: Stages, Optimizer and schedule, Data mixture, SFT) are read from each phase's
config as the pipeline builds it (configs/prolong-8b/base.yaml + the stage's delta + the pipeline's overrides, paths
interpolated, parsed by the `fit` parser: `parse_phase`), i.e. from what would actually run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from prolong_lit.callbacks.optimizer_handoff import CarryOptimizerState
from prolong_lit.data.mixture import block_counts
from prolong_lit.data.prepare import parse_config
from prolong_lit.pipeline.config import load_pipeline_config
from prolong_lit.pipeline.run import parse_phase, phase_fit_args
from prolong_lit.trainer_cli import ProLongCLI

REPO = Path(__file__).resolve().parents[2]
PIPELINES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "phases" in (yaml.safe_load(p.read_text()) or {}))
RECIPE = REPO / "configs/prolong-8b/pipeline.yaml"
BASE = REPO / "configs/prolong-8b/base.yaml"
HANDOFF_CALLBACK = f"{CarryOptimizerState.__module__}.{CarryOptimizerState.__qualname__}"
K, M = 2**10, 2**20

STAGE1_WEIGHTS = {  # paper Table 9 / train_64K.sh
    "code_repos": 0.30, "books": 0.30, "textbooks": 0.03, "fineweb_edu": 0.10, "fineweb": 0.10,
    "stackexchange": 0.04, "wikipedia": 0.04, "tulu_v2": 0.03, "arxiv": 0.03, "openwebmath": 0.03,
}
STAGE2_WEIGHTS = {  # train_512K.sh
    "code_repos_512k": 0.15, "code_repos_64k": 0.15, "books_512k": 0.05, "books_64k": 0.25, "textbooks": 0.03,
    "fineweb_edu": 0.10, "fineweb": 0.10, "stackexchange": 0.04, "wikipedia": 0.04, "tulu_v2": 0.03,
    "arxiv": 0.03, "openwebmath": 0.03,
}
SHORT_DOMAINS = {"textbooks", "fineweb_edu", "fineweb", "stackexchange", "wikipedia", "tulu_v2", "arxiv", "openwebmath"}


@pytest.fixture(autouse=True)
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # pipeline files name configs relative to the repository


@pytest.fixture(scope="module")
def recipe():
    """name -> (phase settings, the phase's fit config as the pipeline builds it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        config = load_pipeline_config(RECIPE)
        return {p.name: (p, phase_fit(config, i)) for i, p in enumerate(config.phases)}


def phase_fit(config, index: int) -> dict:
    """Phase `index`'s complete fit config, as the pipeline writes it to <phase>/fit.yaml."""
    return yaml.safe_load(parse_phase(config, index))


def rows_per_step(fit: dict) -> int:
    """micro_batch x accumulation x data-parallel ranks (devices x nodes / sequence-parallel size)."""
    trainer, data = fit["trainer"], fit["data"]["init_args"]
    ranks = trainer["devices"] * trainer["num_nodes"]
    sequence_parallel = trainer["strategy"]["init_args"]["sequence_parallel_size"]
    assert ranks % sequence_parallel == 0
    return data["micro_batch_size"] * trainer["accumulate_grad_batches"] * ranks // sequence_parallel


def optimizer(fit: dict) -> dict:
    """The AdamW settings of a phase."""
    entry = fit["model"]["init_args"]["optimizer"]
    assert entry["class_path"] == "prolong_lit.model.optim.AdamW"
    return entry["init_args"]


def schedule(fit: dict) -> dict:
    """The warmup + cosine settings of a phase."""
    entry = fit["model"]["init_args"]["scheduler"]
    assert entry["class_path"] == "prolong_lit.model.optim.WarmupCosine"
    return entry["init_args"]


def check_common(fit: dict) -> None:
    """The optimizer settings shared by all three scripts (docs/recipe.md, Optimizer and schedule)."""
    model, trainer = fit["model"]["init_args"], fit["trainer"]
    adamw, strategy = optimizer(fit), trainer["strategy"]
    assert adamw["betas"] == [0.9, 0.95] and adamw["weight_decay"] == 0.1 and adamw["eps"] == 1e-8
    assert schedule(fit)["min_lr_ratio"] == 0.1  # cosine to 10% of the peak
    assert trainer["gradient_clip_val"] == 1.0
    # the model trains at the data's length: fit.yaml leaves model.seq_len unset (it follows data.seq_len)
    assert model["seq_len"] is None
    assert strategy["class_path"] == "prolong_lit.parallel.strategy.FSDP2Strategy"
    assert strategy["init_args"]["activation_checkpointing"] is True and model["kernels"]["loss_chunk_size"] == 2048
    assert strategy["init_args"]["param_dtype"] == "bfloat16"  # --bf16
    assert model["llama"]["rope_scaling"] is None  # a plain base change, no YaRN/NTK scaling


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_pipeline_file_parses(path):
    config = load_pipeline_config(path)
    for i, phase in enumerate(config.phases):
        # the phase's files in order, as repeated --config, before its overrides
        assert phase_fit_args(config, i)[: len(phase.config)] == [f"--config={file}" for file in phase.config]
        fit = phase_fit(config, i)
        assert fit["model"]["class_path"] and fit["data"]["class_path"]
        assert fit["trainer"]["default_root_dir"] == str(Path(config.run_dir) / phase.name)


def test_stage1_64k(recipe):
    phase, fit = recipe["stage1-64k"]
    model, data, trainer = fit["model"]["init_args"], fit["data"]["init_args"], fit["trainer"]
    assert phase.init_from is None and model["llama"]["name_or_path"] == "/path/to/Meta-Llama-3-8B-Instruct"
    assert model["llama"]["rope_theta"] == 8e6 and model["llama"]["max_position_embeddings"] == 65536
    assert data["seq_len"] == 65536 == 64 * K
    assert rows_per_step(fit) == 64 and rows_per_step(fit) * data["seq_len"] == 4 * M  # 4M-token batches
    assert trainer["max_steps"] == 5000
    assert optimizer(fit)["lr"] == 1e-5 and schedule(fit)["warmup_ratio"] == 0.1
    check_common(fit)
    assert trainer["strategy"]["init_args"]["sequence_parallel_size"] == 1
    assert data["weights"] == STAGE1_WEIGHTS


def test_stage2_512k(recipe):
    phase, fit = recipe["stage2-512k"]
    model, data, trainer = fit["model"]["init_args"], fit["data"]["init_args"], fit["trainer"]
    assert phase.init_from == "stage1-64k" and phase.carry_optimizer is True  # moments carried, schedule reset
    assert model["llama"]["name_or_path"] == "runs/prolong-8b/stage1-64k/export"
    hand_off = [c for c in trainer["callbacks"] if c["class_path"] == HANDOFF_CALLBACK]
    assert hand_off[0]["init_args"]["checkpoint"] == "runs/prolong-8b/stage1-64k/checkpoints/final.ckpt"
    assert model["llama"]["rope_theta"] == 1.28e8 and model["llama"]["max_position_embeddings"] == 524288
    assert data["seq_len"] == 524288 == 512 * K
    assert rows_per_step(fit) == 16 and rows_per_step(fit) * data["seq_len"] == 8 * M  # 8M-token batches
    assert trainer["max_steps"] == 2500
    # the released train_512K.sh's 5e-6 (its "fix default LR" commit), not the paper's 1e-5
    assert optimizer(fit)["lr"] == 5e-6 and schedule(fit)["warmup_ratio"] == 0.1
    check_common(fit)
    assert trainer["strategy"]["init_args"]["sequence_parallel_size"] == 8  # --seq_parallel_size 8
    assert data["weights"] == STAGE2_WEIGHTS
    # the note about the learning rate: the paper's 1e-5, and the setting that follows it
    stage = REPO / "configs/prolong-8b/stage2-512k.yaml"
    lines = stage.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "5e-6" in line and line.lstrip().startswith("#"))
    note = lines[start : start + 3]
    assert any("1e-5" in line for line in note) and any("1.0e-5" in line for line in note)
    flag = re.search(r"--model\.\S+=1\.0e-5", "\n".join(note)).group(0)
    merged = ProLongCLI(args=["--config", str(BASE), "--config", str(stage), flag], parse_only=True).config
    assert merged.model.init_args.optimizer.init_args.lr == 1e-5


def test_sft(recipe):
    phase, fit = recipe["sft"]
    model, data, trainer = fit["model"]["init_args"], fit["data"]["init_args"], fit["trainer"]
    assert phase.init_from == "stage2-512k" and phase.carry_optimizer is False
    assert model["llama"]["name_or_path"] == "runs/prolong-8b/stage2-512k/export"
    assert model["llama"]["rope_theta"] is None  # inherits stage 2's 1.28e8
    assert data["seq_len"] == 65536 and rows_per_step(fit) * data["seq_len"] == 4 * M
    assert trainer["max_steps"] == 250
    assert optimizer(fit)["lr"] == 2e-5 and schedule(fit)["warmup_ratio"] == 0.05
    check_common(fit)
    assert trainer["strategy"]["init_args"]["sequence_parallel_size"] == 1  # no sequence parallelism
    assert data["weights"] == {"ultrachat": 1.0}


def test_recipe_paths_are_one_place(tmp_path):
    """Changing `paths` in the pipeline file moves every path of every phase; no placeholder is left over."""
    text = RECIPE.read_text()
    text = text.replace("/path/to/Meta-Llama-3-8B-Instruct", "/models/llama3").replace("data: data", "data: /d")
    text = text.replace("runs: runs/prolong-8b", "runs: /r")
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    config = load_pipeline_config(path)
    fits = {p.name: phase_fit(config, i) for i, p in enumerate(config.phases)}
    assert "/path/to" not in yaml.safe_dump(fits)
    assert fits["stage1-64k"]["model"]["init_args"]["llama"]["name_or_path"] == "/models/llama3"
    assert [f["data"]["init_args"]["data_dir"] for f in fits.values()] == [
        "/d/prolong-64k", "/d/prolong-512k", "/d/ultrachat-64k"]
    assert fits["sft"]["model"]["init_args"]["llama"]["name_or_path"] == "/r/stage2-512k/export"


def test_mixture_weights_are_exact():
    for weights in (STAGE1_WEIGHTS, STAGE2_WEIGHTS):
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
        # the mixture's blocks of 1000 rows hold exactly these shares
        assert block_counts(list(weights.values())).tolist() == [round(w * 1000) for w in weights.values()]
    # ShortMix inside stage 1: 37% of the mixture (FineWeb-Edu and FineWeb 10% each, ...)
    short = sum(STAGE1_WEIGHTS[d] for d in SHORT_DOMAINS - {"textbooks"})
    assert short == pytest.approx(0.37)


def test_data_specs_prepare_each_domain_with_its_length_filter(recipe):
    spec64, _ = parse_config(["--config", "configs/data/prolong-64k.yaml"])
    assert spec64.seq_len == 65536 and set(spec64.domains) == set(STAGE1_WEIGHTS)
    assert recipe["stage1-64k"][1]["data"]["init_args"]["data_dir"].endswith(Path(spec64.output_dir).name)
    for name in ("code_repos", "books"):  # long documents only, one slice of one document per row
        assert (spec64.domains[name].mode, spec64.domains[name].min_length) == ("slice", 65536)
    assert spec64.domains["code_repos"].sources[0].type == "repos"
    for name in SHORT_DOMAINS:
        assert spec64.domains[name].mode == "concat" and spec64.domains[name].min_length is None

    spec512, _ = parse_config(["--config", "configs/data/prolong-512k.yaml"])
    assert spec512.seq_len == 524288 and set(spec512.domains) == set(STAGE2_WEIGHTS)
    for name in ("code_repos_512k", "books_512k"):
        assert (spec512.domains[name].mode, spec512.domains[name].min_length) == ("slice", 524288)
    for name in ("code_repos_64k", "books_64k"):  # 64K slices, eight per row, disjoint from the >= 512K documents
        domain = spec512.domains[name]
        assert (domain.mode, domain.slice_length, domain.min_length, domain.max_length) == (
            "slice_pack", 65536, None, 524287)
    assert {spec512.domains[n].sources[0].type for n in ("code_repos_512k", "code_repos_64k")} == {"repos"}
    assert spec512.domains["code_repos_512k"].sources[0].path == spec512.domains["code_repos_64k"].sources[0].path
    for spec in (spec64, spec512):  # ProLong's stage scripts train on every token of Tulu-v2
        assert [(s.type, s.loss_on) for s in spec.domains["tulu_v2"].sources] == [("chat", "all")]

    sft, _ = parse_config(["--config", "configs/data/ultrachat.yaml"])
    assert sft.seq_len == 65536 and sft.domains["ultrachat"].mode == "sft"


# ProLong's released folder of each domain (prolong-data-64K / -512K); dclm-baseline is released but unweighted
RELEASED_64K = {
    "code_repos": "thestackv1_concat_by_repo-65536", "books": "book-65536", "textbooks": "textbooks",
    "fineweb_edu": "fineweb-edu", "fineweb": "fineweb-2023-50", "stackexchange": "stackexchange",
    "wikipedia": "dolmawiki", "tulu_v2": "tuluv2", "arxiv": "arxiv", "openwebmath": "openwebmath",
}
RELEASED_512K = {
    **{name: folder for name, folder in RELEASED_64K.items() if name not in ("code_repos", "books")},
    "code_repos_512k": "thestackv1_concat_by_repo-524288", "code_repos_64k": "thestackv1_concat_by_repo-65536",
    "books_512k": "book-524288", "books_64k": "book-65536",
}


@pytest.mark.parametrize(
    "mds, raw, released, key",
    [
        ("prolong-64k-mds.yaml", "prolong-64k.yaml", RELEASED_64K, "prolong_64k"),
        ("prolong-512k-mds.yaml", "prolong-512k.yaml", RELEASED_512K, "prolong_512k"),
        ("ultrachat-mds.yaml", "ultrachat.yaml", {"ultrachat": ""}, "ultrachat"),
    ],
)
def test_released_data_specs_build_what_the_raw_ones_do(mds, raw, released, key, tmp_path):
    """The -mds data specs build the same directory, domains and row length as the raw-data ones (so the recipe's
    phases run unchanged on either), each domain from its released folder, under one `paths` entry."""
    spec, _ = parse_config(["--config", f"configs/data/{mds}"])
    raw_spec, _ = parse_config(["--config", f"configs/data/{raw}"])
    assert (spec.output_dir, spec.seq_len, set(spec.domains)) == (
        raw_spec.output_dir, raw_spec.seq_len, set(raw_spec.domains))
    assert set(spec.paths) == {key}
    root = spec.paths[key]
    for name, folder in released.items():
        domain = spec.domains[name]
        assert domain.mode == "rows" and [s.type for s in domain.sources] == ["mds"]
        assert domain.sources[0].path == f"{root}/{folder}".rstrip("/")
        assert domain.sources[0].loss_on == ("all" if name == "tulu_v2" else "assistant")
    text = Path("configs/data", mds).read_text()
    if key != "ultrachat":  # the one released folder the recipe gives no weight is accounted for
        assert "dclm-baseline: released, unused by the recipe" in text
    # the download location is filled in once: changing `paths` moves every source
    assert text.count(root) == 1
    (tmp_path / mds).write_text(text.replace(root, "/elsewhere"))
    moved, _ = parse_config(["--config", str(tmp_path / mds)])
    assert all(s.path.startswith("/elsewhere") for d in moved.domains.values() for s in d.sources)


def test_demo_pipeline_shape():
    config = load_pipeline_config(REPO / "configs/demo/pipeline.yaml")
    fits = [phase_fit(config, i) for i in range(len(config.phases))]
    assert [p.name for p in config.phases] == ["stage1", "stage2", "sft"]
    lengths = [f["data"]["init_args"]["seq_len"] for f in fits]
    thetas = [f["model"]["init_args"]["llama"]["rope_theta"] for f in fits]
    assert lengths[1] > lengths[0] and thetas[1] > thetas[0] == 8e6 and thetas[2] is None
    assert [p.carry_optimizer for p in config.phases] == [False, True, False]
    assert fits[2]["data"]["init_args"]["data_dir"] == "data/demo-sft"
    for fit in fits:  # an evaluation at the end of every phase
        assert any(c["class_path"].endswith("LongContextEval") for c in fit["trainer"]["callbacks"])
    # stage1 is the pretraining demo as it is (make demo = prepare + this pipeline)
    pretrain = yaml.safe_load((REPO / "configs/demo/pretrain.yaml").read_text())
    assert config.phases[0].config == ["configs/demo/pretrain.yaml"] and not config.phases[0].overrides
    assert fits[0]["trainer"]["max_steps"] == pretrain["trainer"]["max_steps"]
    tokens = sum(f["trainer"]["max_steps"] * f["data"]["init_args"]["seq_len"] for f in fits)
    assert tokens <= 30 * 2048 + 8 * 4096 + 8 * 1024  # measured 6.4 min on 2 idle cores (the budget is 8)
    assert parse_config(["--config", "configs/data/demo-sft.yaml"])[0].output_dir == "data/demo-sft"
