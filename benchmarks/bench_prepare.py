"""Throughput and peak memory of the streaming ``s2moe prepare`` (``data.dataset=corpus``):

    python benchmarks/bench_prepare.py [--size-gb 2] [--workers 1,0] [--format jsonl] [--tokenizer char]

Generates a corpus of the given size in a temporary folder (files of ``--file-mb`` each, one JSON
document per line, or ``.txt`` files of one document each, optionally gzipped; the text is random slices of a
synthetic word stream with a little non-ASCII), runs the real command (``python -m s2moe_ds.cli prepare
data.dataset=corpus ...``) in a subprocess for each worker count, and prints the input MB/s (uncompressed
bytes / wall time, all passes) and the peak RSS of the main process and of the largest tokenisation
worker (``getrusage``'s ru_maxrss, read inside the child). Everything is deleted afterwards. Needs about
twice ``--size-gb`` of free disk in ``--tmp`` (corpus plus token files).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import table  # noqa: E402

# runs inside the child: the CLI, then its own and its workers' peak RSS as one JSON line on stdout
CHILD = """
import json, resource, sys
from s2moe_ds.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def text_pool(n_bytes: int = 8 << 20, seed: int = 0) -> str:
    """A stream of synthetic words (Zipf-like frequencies, ~1% non-ASCII) to cut documents from."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)))) for _ in range(20000)]
    words += [
        "caf\u00e9",
        "na\u00efve",
        "\u00fcber",
        "\u65e5\u672c\u8a9e",
        "\u00e5ngstr\u00f6m",
        "\u2014",
        "\U0001f600",
    ]
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    rng.shuffle(p)
    ids = rng.choice(len(words), size=n_bytes // 6, p=p / p.sum())
    out, line = [], 0
    for i in ids:
        out.append(words[i])
        line += 1
        if line >= 14:
            out.append(".\n" if rng.random() < 0.3 else ".")
            line = 0
    return " ".join(out)


def generate(folder: Path, size_bytes: int, fmt: str = "jsonl", file_mb: int = 100, seed: int = 0) -> int:
    """Write about ``size_bytes`` of documents into ``folder`` as ``fmt`` ('jsonl', 'jsonl.gz', 'txt',
    'txt.gz'); returns the uncompressed bytes of text written (the JSON framing adds a little)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = text_pool(seed=seed)
    rng = np.random.default_rng(seed + 1)
    written, file_no = 0, 0
    gz = fmt.endswith(".gz")
    while written < size_bytes:
        name = folder / f"part-{file_no:05d}.{fmt}"
        opener = (
            (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1))
            if gz
            else (lambda p: open(p, "w", encoding="utf-8"))
        )
        target = min(file_mb << 20, size_bytes - written)
        in_file = 0
        if fmt.startswith("jsonl"):
            with opener(name) as f:
                lines = []
                while in_file < target:
                    n = int(rng.integers(200, 8000))
                    start = int(rng.integers(0, len(pool) - n))
                    line = json.dumps({"id": file_no, "text": pool[start : start + n]}, ensure_ascii=False) + "\n"
                    lines.append(line)
                    in_file += len(line.encode("utf-8"))
                    if len(lines) >= 2000:
                        f.write("".join(lines))
                        lines = []
                f.write("".join(lines))
        else:
            # one .txt document per file: files of ~file_mb in folders of 100 (stress the folder walk a little)
            sub = folder / f"d{file_no // 100:03d}"
            sub.mkdir(exist_ok=True)
            name = sub / name.name
            with opener(name) as f:
                while in_file < target:
                    n = min(1 << 20, target - in_file)
                    start = int(rng.integers(0, len(pool) - n))
                    piece = pool[start : start + n]
                    f.write(piece)
                    in_file += len(piece.encode("utf-8"))
        written += in_file
        file_no += 1
    return written


def run_prepare(source: Path, out: Path, workers: int, extra: list[str], timeout: int = 7200) -> dict:
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        "prepare",
        "--no-progress",
        "data.dataset=corpus",
        f"data.source={source}",
        f"data.data_dir={out}",
        f"data.workers={workers}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = json.loads((out / "meta.json").read_text())
    return {"wall_s": wall, "meta": meta, **usage}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="corpus size (uncompressed text), GB")
    ap.add_argument("--workers", default="1,0", help="comma-separated data.workers values (0: one per core)")
    ap.add_argument("--format", default="jsonl", choices=("jsonl", "jsonl.gz", "txt", "txt.gz"))
    ap.add_argument("--file-mb", type=int, default=100, help="size of each generated file")
    ap.add_argument("--tokenizer", default="char", help="data.tokenizer (char, sentencepiece or a file)")
    ap.add_argument("--tmp", default=None, help="where to put the corpus and the token files (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus (prints its folder)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        nbytes = generate(root / "corpus", int(args.size_gb * 1e9), args.format, args.file_mb)
        print(
            f"generated {nbytes / 1e9:.2f} GB ({args.format}) in {time.perf_counter() - t0:.0f} s under {root}",
            flush=True,
        )
        rows = []
        for w in [int(x) for x in args.workers.split(",")]:
            out = root / f"out_w{w}"
            r = run_prepare(root / "corpus", out, w, [f"data.tokenizer={args.tokenizer}"])
            meta = r["meta"]
            src_mb = meta["source_bytes"] / 1e6
            rows.append(
                [
                    str(meta["workers"]) + (" (all cores)" if w == 0 else ""),
                    f"{meta['source_bytes'] / 1e9:.2f}",
                    f"{sum(meta['documents'].values()):,}",
                    f"{sum(meta['splits'].values()) / 1e6:,.0f}",
                    f"{r['wall_s']:.0f}",
                    f"{src_mb / r['wall_s']:.1f}",
                    f"{r['self_kb'] / 1024:.0f}",
                    f"{r['children_kb'] / 1024:.0f}" if meta["workers"] > 1 else "-",
                ]
            )
            print(table(rows[-1:], HEADER), flush=True)
            shutil.rmtree(out)
        print()
        print(f"corpus: {nbytes / 1e9:.2f} GB of {args.format}, {args.file_mb} MB files; tokenizer {args.tokenizer}")
        print(table(rows, HEADER))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


HEADER = [
    "workers",
    "input GB",
    "documents",
    "tokens (M)",
    "wall (s)",
    "MB/s",
    "peak RSS main (MiB)",
    "peak RSS worker (MiB)",
]

if __name__ == "__main__":
    main()
