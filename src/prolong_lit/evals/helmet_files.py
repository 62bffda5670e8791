"""Where HELMET's released task files live, what each line must hold, and a reader that says where a line is bad.

`helmet_dir` is the `data/` folder of HELMET's `data.tar.gz` (`princeton-nlp/HELMET` on the HF hub), or the folder
that contains it. Paths below are relative to it. One file per HELMET length; an evaluation length L uses the file
of the smallest HELMET length >= L (the largest, 128K, above that) and then cuts the context to fit L.

Files per task (K is the number of passages / pairs of the file for each HELMET length 4K..128K):

- `helmet_json_kv`: `json_kv/test_k{K}_dep6.jsonl`, K = 50/105/220/440/900/1800; demos are in the records.
- `kilt_nq`, `kilt_triviaqa`: `kilt/{nq,triviaqa}-dev-multikilt_1000_k{K}_dep6.jsonl`, K = 20/50/105/220/440/1000;
  demos `kilt/{nq,triviaqa}-train-multikilt_1000_k3_dep6.jsonl`.
- `kilt_hotpotqa`: `kilt/hotpotqa-dev-multikilt_1000_k{K}_dep3.jsonl`; demos
  `kilt/hotpotqa-train-multikilt_1000_k3_dep3.jsonl`.
- `kilt_popqa_3`: `kilt/popqa_test_1000_k{K}_dep6.jsonl`; demos `kilt/popqa_test_1000_k3_dep6.jsonl`.
- `msmarco_rerank_psg`: `msmarco/test_reranking_data_k{K}_dep3.jsonl`, K = 14/50/130/285/600/1000; demos
  `msmarco/test_reranking_data_k10_dep3.jsonl`.
- `icl_<name>` (name: trec_coarse, trec_fine, banking77, clinic150, nlu): `icl/<name>/test.jsonl` and
  `icl/<name>/train.jsonl`, our own schema (below).
- Long-document QA and summarization (HELMET loads these from the HF hub; here they are local exports of those
  datasets, one file for every length; schemas in `longdoc`): `narrativeqa/{test,train}.jsonl`,
  `infbench/longbook_{qa,choice,sum}_eng.jsonl` (InfiniteBench's own file names), and
  `multi_lexsum/{validation,train}.jsonl`.
- Citations (ALCE; schemas in `citations`): `alce/{asqa,qampari}_eval_gtr_top2000.json` from HELMET's tarball, and
  the prompt file `prompts/{asqa,qampari}_revised.json` from HELMET's repository, looked for in this folder and
  then in its parent (a HELMET checkout holds `prompts/` next to `data/`).

Line schemas (one JSON object per line; extra fields are ignored):

- JSON KV: `context` str (the JSON object as text), `question` str (the key), `answer` str (the value),
  `demos` list of [key, value] string pairs (the first 2 are the demonstrations), optional `depth` (a fraction, or a
  percentage if > 1) and `num_kvs`.
- RAG (test and demo files): `question` str, `answers` non-empty list of str, `ctxs` list of {`title` str,
  `text` str, ...}, optional `depth`, optional `id` (the sampling key; else `question`). PopQA also needs `s_pop`
  (number; `kilt_popqa_3` keeps log10(s_pop) < 3).
- MS MARCO: `qid` str, `query` str, `ctxs` list of {`id` str, `label` int, `text` str, optional `title` str}.
- ICL (HELMET loads these from the HF hub; here they are local files of our own schema): `text` str and `label`
  (int class id, or str class name) per line, in `train.jsonl` and `test.jsonl`. `write_icl_jsonl` converts any
  iterable of records, e.g. a `datasets` split:
  `write_icl_jsonl(load_dataset("CogComp/trec")["train"], d / "train.jsonl", label_field="coarse_label")`
  (HELMET's sources: CogComp/trec coarse_label / fine_label, PolyAI/banking77 label, clinc_oos "plus" intent with
  the validation split as test, xingkunliuxtracta/nlu_evaluation_data label split 90/10 with seed 42).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prolong_lit.errors import ConfigError, DataError

HELMET_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
JSON_KV_K = dict(zip(HELMET_LENGTHS, (50, 105, 220, 440, 900, 1800)))
KILT_K = dict(zip(HELMET_LENGTHS, (20, 50, 105, 220, 440, 1000)))
MSMARCO_K = dict(zip(HELMET_LENGTHS, (14, 50, 130, 285, 600, 1000)))
# HELMET's shot counts per length (icl.yaml, icl_short.yaml); 4K is not in HELMET: half of the 8K count.
ICL_SHOTS = {
    "trec_coarse": dict(zip(HELMET_LENGTHS, (200, 400, 800, 1600, 3300, 6600))),
    "trec_fine": dict(zip(HELMET_LENGTHS, (200, 400, 800, 1600, 3200, 6400))),
    "banking77": dict(zip(HELMET_LENGTHS, (180, 360, 720, 1450, 2900, 5900))),
    "clinic150": dict(zip(HELMET_LENGTHS, (220, 440, 880, 1750, 3525, 7050))),
    "nlu": dict(zip(HELMET_LENGTHS, (255, 510, 1020, 2040, 4080, 8296))),
}
RAG_FILES = {  # task -> (test file pattern, demo file)
    "kilt_nq": ("kilt/nq-dev-multikilt_1000_k{k}_dep6.jsonl", "kilt/nq-train-multikilt_1000_k3_dep6.jsonl"),
    "kilt_triviaqa": (
        "kilt/triviaqa-dev-multikilt_1000_k{k}_dep6.jsonl",
        "kilt/triviaqa-train-multikilt_1000_k3_dep6.jsonl",
    ),
    "kilt_hotpotqa": (
        "kilt/hotpotqa-dev-multikilt_1000_k{k}_dep3.jsonl",
        "kilt/hotpotqa-train-multikilt_1000_k3_dep3.jsonl",
    ),
    "kilt_popqa_3": ("kilt/popqa_test_1000_k{k}_dep6.jsonl", "kilt/popqa_test_1000_k3_dep6.jsonl"),
}
ICL_TASKS = {f"icl_{name}": name for name in ICL_SHOTS}
# Tasks with one set of files for every length (role -> path); the context is cut to each length instead.
LONGDOC_FILES = {
    "narrativeqa": {"test": "narrativeqa/test.jsonl", "train": "narrativeqa/train.jsonl"},
    "infbench_qa_eng": {"test": "infbench/longbook_qa_eng.jsonl"},
    "infbench_choice_eng": {"test": "infbench/longbook_choice_eng.jsonl"},
    "infbench_sum_eng": {"test": "infbench/longbook_sum_eng.jsonl"},
    "multi_lexsum": {"test": "multi_lexsum/validation.jsonl", "train": "multi_lexsum/train.jsonl"},
}
ALCE_FILES = {
    f"alce_{name}": {"test": f"alce/{name}_eval_gtr_top2000.json", "prompt": f"prompts/{name}_revised.json"}
    for name in ("asqa", "qampari")
}
HELMET_TASKS = ("helmet_json_kv", *RAG_FILES, "msmarco_rerank_psg", *ICL_TASKS, *LONGDOC_FILES, *ALCE_FILES)


def helmet_length(length: int) -> int:
    """The HELMET length whose files serve an evaluation at `length` tokens."""
    return next((h for h in HELMET_LENGTHS if h >= length), HELMET_LENGTHS[-1])


def resolve_helmet_dir(helmet_dir: str | Path) -> Path:
    """Accept the extracted `data/` folder or its parent."""
    root = Path(helmet_dir)
    return root / "data" if (root / "data").is_dir() else root


def task_files(task: str, length: int) -> dict[str, str]:
    """The files (relative to the HELMET dir) `task` reads at `length`: {"test": ..., "demo"/"train": ...}."""
    h = helmet_length(length)
    if task == "helmet_json_kv":
        return {"test": f"json_kv/test_k{JSON_KV_K[h]}_dep6.jsonl"}
    if task in RAG_FILES:
        test, demo = RAG_FILES[task]
        return {"test": test.format(k=KILT_K[h]), "demo": demo}
    if task == "msmarco_rerank_psg":
        return {
            "test": f"msmarco/test_reranking_data_k{MSMARCO_K[h]}_dep3.jsonl",
            "demo": "msmarco/test_reranking_data_k10_dep3.jsonl",
        }
    if task in ICL_TASKS:
        return {"test": f"icl/{ICL_TASKS[task]}/test.jsonl", "train": f"icl/{ICL_TASKS[task]}/train.jsonl"}
    if task in LONGDOC_FILES:
        return dict(LONGDOC_FILES[task])
    if task in ALCE_FILES:
        return dict(ALCE_FILES[task])
    raise ConfigError(f"unknown HELMET task {task!r}; known: {list(HELMET_TASKS)}")


def locate(root: Path, rel: str) -> Path:
    """`root / rel`, or for HELMET's `prompts/` files (kept in its repository, not its data tarball) the same path
    in `root`'s parent when `root` lacks it."""
    path = root / rel
    if not path.is_file() and rel.startswith("prompts/") and (root.parent / rel).is_file():
        return root.parent / rel
    return path


# ---- line schemas: each checker returns None when the record is fine, else what is wrong -----------------------


def _str(r: Mapping, key: str) -> str | None:
    return None if isinstance(r.get(key), str) else f"field {key!r} must be a string"


def _number(r: Mapping, key: str, optional: bool = False) -> str | None:
    if optional and r.get(key) is None:
        return None
    ok = isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
    return None if ok else f"field {key!r} must be a number"


def _str_list(r: Mapping, key: str) -> str | None:
    value = r.get(key)
    ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    return None if ok else f"field {key!r} must be a non-empty list of strings"


def _ctxs(r: Mapping, fields: dict[str, type]) -> str | None:
    ctxs = r.get("ctxs")
    if not isinstance(ctxs, list):
        return "field 'ctxs' must be a list of passages"
    for i, ctx in enumerate(ctxs):
        for key, kind in fields.items():
            if not isinstance(ctx, Mapping) or not isinstance(ctx.get(key), kind) or isinstance(ctx.get(key), bool):
                return f"ctxs[{i}] must have a {kind.__name__} {key!r}"
    return None


def check_json_kv(r: Mapping) -> str | None:
    for problem in (_str(r, "context"), _str(r, "question"), _str(r, "answer"), _number(r, "depth", True)):
        if problem:
            return problem
    demos = r.get("demos")
    if not isinstance(demos, list) or not all(
        isinstance(d, (list, tuple)) and len(d) == 2 and all(isinstance(x, str) for x in d) for d in demos
    ):
        return "field 'demos' must be a list of [key, value] string pairs"
    return None


def check_rag(r: Mapping, popqa: bool = False) -> str | None:
    checks = [_str(r, "question"), _str_list(r, "answers"), _ctxs(r, {"title": str, "text": str})]
    checks.append(_number(r, "depth", True))
    if popqa:
        checks.append(_number(r, "s_pop"))
    return next((c for c in checks if c), None)


def check_rerank(r: Mapping) -> str | None:
    checks = (_str(r, "qid"), _str(r, "query"), _ctxs(r, {"id": str, "label": int, "text": str}))
    return next((c for c in checks if c), None)


def check_icl(r: Mapping) -> str | None:
    if _str(r, "text"):
        return _str(r, "text")
    label = r.get("label")
    ok = isinstance(label, str) or (isinstance(label, int) and not isinstance(label, bool))
    return None if ok else "field 'label' must be an int class id or a string class name"


def _decode(raw: bytes, path: Path, lineno: int) -> tuple[str | None, str | None]:
    """(text, None) for a UTF-8 line, else (None, the error naming file:line)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"


def _parse_line(text: str, path: Path, lineno: int, check: Callable[[Mapping], str | None]):
    """(record, None) for a well-formed line, else (None, the error naming file:line)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, f"{path}:{lineno}: JSON nested too deeply"
    problem = "not a JSON object" if not isinstance(record, dict) else check(record)
    return (None, f"{path}:{lineno}: {problem}") if problem else (record, None)


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise DataError("malformed HELMET data:\n  " + "\n  ".join(errors))


def read_jsonl(path: Path, check: Callable[[Mapping], str | None], max_errors: int = 5) -> list[dict]:
    """All records of a JSON-lines file; a bad line (not UTF-8, not JSON, not the schema) raises DataError naming
    `file:line` (up to `max_errors` of them)."""
    if not path.is_file():
        raise DataError(f"HELMET file {path} does not exist")
    records, errors = [], []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported, not a crash of the whole read
        for lineno, raw in enumerate(f, start=1):
            text, problem = _decode(raw, path, lineno)
            if text is not None and text.strip():
                record, problem = _parse_line(text, path, lineno, check)
                if record is not None:
                    records.append(record)
            if problem:
                errors.append(problem)
            if len(errors) >= max_errors:
                break
    _raise_errors(errors)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def read_json_list(path: Path, check: Callable[[Mapping], str | None], max_errors: int = 5) -> list[dict]:
    """The records of a file holding one JSON array of objects (ALCE's `.json` files); a bad item raises
    DataError naming the file and the item (a syntax error: its line)."""
    if not path.is_file():
        raise DataError(f"HELMET file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"malformed HELMET data:\n  {path}:{line}: not UTF-8 text") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed HELMET data:\n  {path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(items, dict) and isinstance(items.get("data"), list):
        items = items["data"]  # HELMET reads `.json` files with field="data" when they have one
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of records")
    errors = []
    for i, item in enumerate(items):
        problem = "not a JSON object" if not isinstance(item, dict) else check(item)
        if problem:
            errors.append(f"{path}: item {i}: {problem}")
        if len(errors) >= max_errors:
            break
    _raise_errors(errors)
    if not items:
        raise DataError(f"{path}: the file holds no records")
    return items


def read_json_object(path: Path, check: Callable[[Mapping], str | None]) -> dict:
    """A file holding one JSON object (HELMET's ALCE prompt files), checked by `check`."""
    if not path.is_file():
        raise DataError(f"HELMET file {path} does not exist")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a UTF-8 JSON file ({err})") from None
    problem = "not a JSON object" if not isinstance(record, dict) else check(record)
    if problem:
        raise DataError(f"{path}: {problem}")
    return record


def write_icl_jsonl(
    records: Iterable[Mapping], path: str | Path, text_field: str = "text", label_field: str = "label"
) -> int:
    """Write an ICL split in our schema (`{"text": ..., "label": ...}` per line); returns the number of lines."""
    rows = []
    for i, record in enumerate(records):
        row = {"text": record[text_field], "label": record[label_field]}
        problem = check_icl(row)
        if problem:
            raise DataError(
                f"record {i} of the ICL data: {problem} (text_field={text_field!r}, label_field={label_field!r})"
            )
        rows.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return len(rows)
