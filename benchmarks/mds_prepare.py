"""Speed and memory of `prepare` in mode rows on an MDS dataset in ProLong's layout, against `cat` of its files.

The dataset is written by this script's own minimal MDS writer (`write_shard`, uncompressed, the format facts of
docs/data-formats.md; mosaicml-streaming is not installed in the project): ProLong's columns (`input_ids`
ndarray:uint32, `indices` ndarray:uint32 (n, 2), `domain` str, `length` uint64), rows of --seq-len tokens cut into
1-16 documents, shards of at most 64 MiB (ProLong's size_limit) in two `procNN-02` sub-folders under a merged
root index.json, like `prolong-data-64K/<domain>/`. It is written once per size into --dir.

Per size, interleaved and repeated (--repeats, median reported), with the shard files' page cache cold and warm
(--cache):

- `cat <every shard file> > /dev/null`: the floor of reading the bytes;
- `prepare` (mode rows, num_workers --workers) into a fresh output directory, run in a fresh process; its time is
  the `prepare()` call alone, split into stages: validate (tokenizer load, index and shard header checks), convert
  (reading, checking and converting every row and writing the litdata chunk files, `num_workers` processes),
  rest (everything else: moving the domain into place, the manifest).

cold: right before each of the two timed commands the page cache is dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`, needs root), so both read the shards from the disk: this is the comparison the goal
"bounded by the disk" means (a first conversion of downloaded data). Where that is not permitted, the shard files
alone are evicted with posix_fadvise(DONTNEED) (any user may, for clean pages) and a note says so; then the
libraries prepare imports stay cached, which flatters prepare by their load time. warm: the files are in the page
cache (having just been read or written): both sides read from memory, the strictest ratio.

Memory, over every process of the run (the preparing process, its shard readers, litdata's writer):
- peak anonymous RSS: the largest `RssAnon` of any one process, sampled every 20 ms from /proc (the memory the
  run really holds: heaps, shard buffers; forked processes also count the pages they share with their parent);
- peak VmHWM: the largest resident high-water mark of any one process (`getrusage`), which also counts pages of
  files a process maps: litdata's writer reads the scratch token file through a memory map, so this one grows
  with the data even though those pages are clean page cache the kernel can drop at any time.
Memory is flat when the anonymous peak does not grow with the dataset size.

    python benchmarks/mds_prepare.py                         # 0.25 GB and 1 GB
    python benchmarks/mds_prepare.py --sizes-gb 0.1 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, markdown_table, median, report, setup_env, spread

log = logging.getLogger("mds_prepare")

VOCAB = 128_256
SIZE_LIMIT = 1 << 26  # ProLong's shards: ~67 MB
COLUMNS = {"domain": "str", "indices": "ndarray:uint32", "input_ids": "ndarray:uint32", "length": "uint64"}
RATIO_TARGET = 0.5


def encode_row(ids: np.ndarray, spans: np.ndarray, domain: str) -> bytes:
    """One MDS sample of COLUMNS (sorted names): sizes of the variable columns, then each column's bytes."""
    def ndarray(a: np.ndarray) -> bytes:  # ndarray:uint32 gives the dtype: ndim << 2 | uint32 code, shape, values
        return bytes([(a.ndim << 2) | 2]) + np.array(a.shape, np.uint32).tobytes() + a.tobytes()

    columns = [domain.encode(), ndarray(spans), ndarray(ids)]
    return (np.array([len(c) for c in columns], np.uint32).tobytes() + b"".join(columns)
            + np.uint64(len(ids)).tobytes())


def write_shard(path: Path, samples: list[bytes]) -> dict:
    """An uncompressed MDS shard file and its index.json entry (basename relative to the shard's folder)."""
    config = json.dumps({"column_encodings": list(COLUMNS.values()), "column_names": list(COLUMNS),
                         "column_sizes": [None, None, None, 8], "compression": None, "format": "mds",
                         "hashes": [], "size_limit": SIZE_LIMIT, "version": 2}, sort_keys=True).encode()
    header = 4 + 4 * (len(samples) + 1) + len(config)
    offsets = header + np.concatenate([[0], np.cumsum([len(s) for s in samples])])
    with open(path, "wb") as f:
        f.write(np.uint32(len(samples)).tobytes() + offsets.astype(np.uint32).tobytes() + config)
        for sample in samples:
            f.write(sample)
    entry = {**json.loads(config), "raw_data": {"basename": path.name, "bytes": int(offsets[-1]), "hashes": {}},
             "samples": len(samples), "zip_data": None}
    return entry


def write_dataset(root: Path, rows: int, seq_len: int, seed: int = 0) -> None:
    """`rows` rows in two procNN-02 folders of <= SIZE_LIMIT shards, and the merged root index."""
    rng = np.random.default_rng(seed)
    merged = []
    for proc in range(2):
        folder = root / f"proc{proc:02d}-02"
        folder.mkdir(parents=True)
        entries, pending, size = [], [], 0
        for _ in range(rows // 2 + (proc < rows % 2)):
            cuts = np.sort(rng.choice(np.arange(1, seq_len), size=int(rng.integers(0, 16)), replace=False))
            edges = np.concatenate([[0], cuts, [seq_len]]).astype(np.uint32)
            ids = rng.integers(0, VOCAB, size=seq_len, dtype=np.uint32)
            sample = encode_row(ids, np.stack([edges[:-1], edges[1:]], axis=1), f"bench/{seq_len}")
            if pending and size + len(sample) > SIZE_LIMIT:
                entries.append(write_shard(folder / f"shard.{len(entries):05d}.mds", pending))
                pending, size = [], 0
            pending.append(sample)
            size += len(sample) + 4
        entries.append(write_shard(folder / f"shard.{len(entries):05d}.mds", pending))
        (folder / "index.json").write_text(json.dumps({"version": 2, "shards": entries}))
        for entry in entries:
            merged.append({**entry, "raw_data": {**entry["raw_data"],
                                                 "basename": f"{folder.name}/{entry['raw_data']['basename']}"}})
    (root / "index.json").write_text(json.dumps({"version": 2, "shards": merged}))


# Runs in a fresh process: prepare() timed by stage, then the resident high-water marks.
PREPARE_RUN = """
import json, resource, sys, time
import prolong_lit.data.prepare as P
times = {}
def timed(name, fn):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return run
P.validate = timed("validate", P.validate)
P.build_rows_domain = timed("convert", P.build_rows_domain)
config, overwrite = P.parse_config(["--config", sys.argv[1]])
start = time.perf_counter()
P.prepare(config, overwrite)
total = time.perf_counter() - start
kib = {who: resource.getrusage(getattr(resource, who)).ru_maxrss for who in ("RUSAGE_SELF", "RUSAGE_CHILDREN")}
print("RESULT " + json.dumps({"total": total, **times, **kib}))
"""


def run_prepare(data: Path, out: Path, seq_len: int, workers: int) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / "bench.yaml"
    config.write_text(json.dumps({"tokenizer": "llama3", "output_dir": str(out), "seq_len": seq_len,
                                  "num_workers": workers,
                                  "domains": {"bench": {"mode": "rows", "sources": [{"type": "mds",
                                                                                       "path": str(data)}]}}}))
    shutil.rmtree(out, ignore_errors=True)
    logs = out.parent / "prepare.log"
    with open(logs, "w") as err:
        child = subprocess.Popen([sys.executable, "-c", PREPARE_RUN, str(config)], stdout=subprocess.PIPE,
                                 stderr=err, text=True, cwd=REPO)
        peak_anon = 0
        while child.poll() is None:
            peak_anon = max([peak_anon, *(rss_anon_kib(pid) for pid in process_tree(child.pid))])
            time.sleep(0.02)
    stdout = child.stdout.read()
    if child.returncode:
        raise RuntimeError(f"prepare failed:\n{logs.read_text()[-3000:]}")
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    shutil.rmtree(out)
    return {**result, "anon": peak_anon}


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def rss_anon_kib(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("RssAnon:")), 0)


def evict(files: list[Path]) -> str:
    """Drop the page cache (all of it; else only the shard files'), so the next command reads the shards from the
    disk; returns the method used."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def run_cat(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", default="0.25,1", help="dataset sizes in GB (10^9 bytes), comma-separated")
    parser.add_argument("--seq-len", type=int, default=65536, help="tokens per row (ProLong: 65536 or 524288)")
    parser.add_argument("--workers", type=int, default=2, help="prepare's num_workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="cold,warm", help="page cache states of the shards: cold, warm or both")
    parser.add_argument("--dir", default="/tmp/mds_prepare_bench", help="where the datasets and outputs go")
    parser.add_argument("--keep", action="store_true", help="keep the generated datasets")
    args = parser.parse_args()
    setup_env()
    base = Path(args.dir)
    rows_out, notes, methods = [], [], set()
    caches = args.cache.split(",")
    for size_gb in (float(s) for s in args.sizes_gb.split(",")):
        data = base / f"data-{size_gb:g}GB"
        rows = max(2, round(size_gb * 1e9 / (4 * args.seq_len)))
        if not (data / "index.json").is_file():
            shutil.rmtree(data, ignore_errors=True)
            start = time.perf_counter()
            write_dataset(data, rows, args.seq_len)
            log.info("wrote %s (%d rows) in %.1f s", data, rows, time.perf_counter() - start)
        files = sorted(data.glob("proc*/shard.*.mds"))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        cat = {cache: [] for cache in caches}
        runs = {cache: [] for cache in caches}
        for repeat in range(args.repeats):
            for cache in caches:
                if cache == "cold":
                    methods.add(evict(files))
                cat[cache].append(run_cat(files))
                if cache == "cold":
                    evict(files)
                runs[cache].append(run_prepare(data, base / "out" / "prepared", args.seq_len, args.workers))
                log.info("%g GB repeat %d %s: cat %.2f s, prepare %s", size_gb, repeat, cache, cat[cache][-1],
                         runs[cache][-1])
        for cache in caches:
            totals = [r["total"] for r in runs[cache]]
            ratios = [c / p for c, p in zip(cat[cache], totals)]  # (MB / prepare s) / (MB / cat s)
            for r in runs[cache]:
                r["rest"] = r["total"] - r.get("validate", 0.0) - r.get("convert", 0.0)
            stages = ", ".join(f"{stage} {median([r.get(stage, 0.0) for r in runs[cache]]):.1f} s" for stage in
                               ("validate", "convert", "rest"))
            hwm = max(max(r["RUSAGE_SELF"], r["RUSAGE_CHILDREN"]) for r in runs[cache]) / 1024
            anon = max(r["anon"] for r in runs[cache]) / 1024
            rows_out.append([f"{megabytes:,.0f} MB ({len(files)} shards, {rows:,} rows)", cache,
                             megabytes / median(cat[cache]), spread([megabytes / c for c in cat[cache]]),
                             megabytes / median(totals), spread([megabytes / t for t in totals]), median(ratios),
                             stages, anon, hwm])
        if not args.keep:
            shutil.rmtree(data)
    table = markdown_table(["dataset", "page cache", "cat MB/s", "range", "prepare MB/s", "range", "prepare / cat",
                            "prepare stages", "peak anon RSS MiB", "peak VmHWM MiB"], rows_out)
    notes.append(f"seq_len {args.seq_len}, num_workers {args.workers}, median of {args.repeats} interleaved runs; "
                 f"target prepare / cat >= {RATIO_TARGET}")
    if methods == {"drop_caches"}:
        notes.append("cold: page cache dropped before each timed command (sync; echo 3 > /proc/sys/vm/drop_caches)")
    elif methods:
        notes.append("cold: dropping the page cache was NOT permitted here: only the shard files were evicted "
                     "(posix_fadvise DONTNEED); the libraries prepare loads stayed cached")
    report("prepare (mode rows) on ProLong-layout MDS against cat", table, notes)


if __name__ == "__main__":
    main()
