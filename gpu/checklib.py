"""Helpers for gpu/check.sh: verify the kit, judge each step's output, collect versions, write the report.

    python gpu/checklib.py verify-kit KIT --python X.Y [--dry-run]
    python gpu/checklib.py pytest JUNIT_XML [--all-must-run]
    python gpu/checklib.py run RUN_DIR --log TRAIN_LOG --eval EVAL_JSON --sample SAMPLE_TXT --device cuda
    python gpu/checklib.py versions OUT_JSON --kit KIT
    python gpu/checklib.py report WORK REPORT_MD --mode gpu|dry
    python gpu/checklib.py summary WORK CHECK_JSON --mode gpu|dry

Each judging command prints one line starting ``::note::`` (what the report shows for the step) and exits 0
when the step passed, 1 when it failed. Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def note(text: str, ok: bool = True) -> int:
    print(f"::note:: {text}", flush=True)
    return 0 if ok else 1


# --- the kit -------------------------------------------------------------------------------------------


def verify_kit(args) -> int:
    kit = Path(args.kit)
    manifest_path = kit / "kit.json"
    if not manifest_path.is_file():
        return note(
            f"{manifest_path} is missing: run `bash gpu/prepare.sh` on a machine with PyPI access and "
            f"carry the folder it writes",
            ok=False,
        )
    manifest = json.loads(manifest_path.read_text())
    bad = []
    for f in manifest["files"]:
        p = kit / f["path"]
        if not p.is_file():
            bad.append(f"{f['path']} missing")
        elif p.stat().st_size != f["bytes"] or hashlib.sha256(p.read_bytes()).hexdigest() != f["sha256"]:
            bad.append(f"{f['path']} differs from kit.json (size or sha256): a truncated or changed copy")
    tag = "cp" + args.python.replace(".", "")
    compiled = [f["path"] for f in manifest["files"] if f["path"].startswith("wheels/") and "-cp3" in f["path"]]
    if compiled and not any(f"-{tag}-" in p for p in compiled):
        built_for = sorted({re.search(r"-(cp3\d+)-", p).group(1) for p in compiled})
        hint = (
            "prepare the kit with this Python (PYTHON=... bash gpu/prepare.sh) for a dry run"
            if args.dry_run
            else f"prepare it with --python-version {args.python}"
        )
        bad.append(f"no compiled wheel for CPython {args.python} ({tag}); the kit holds {', '.join(built_for)}: {hint}")
    if not args.dry_run and manifest["target_python"] != args.python:
        bad.append(f"the kit targets Python {manifest['target_python']} but this machine runs {args.python}")
    total = sum(f["bytes"] for f in manifest["files"])
    if bad:
        for b in bad:
            print(f"kit: {b}", file=sys.stderr)
        return note("; ".join(bad), ok=False)
    return note(
        f"{len(manifest['files'])} files, {total / 2**20:.1f} MiB, prepared {manifest['prepared']}, "
        f"every sha256 matches"
    )


# --- pytest --------------------------------------------------------------------------------------------


def junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    failed, skipped = [], []
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(s.get(key, 0))
        counts["time"] += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            sk = case.find("skipped")
            if sk is not None:
                skipped.append(f"{name} ({sk.get('message', '')[:120]})")
    counts["failed_names"], counts["skipped_names"] = failed, skipped
    return counts


def pytest_step(args) -> int:
    path = Path(args.junit)
    if not path.is_file():
        return note(f"pytest wrote no {path.name} (it did not run to the end; see the step's log)", ok=False)
    c = junit_counts(path)
    bad = c["failures"] + c["errors"]
    passed = c["tests"] - bad - c["skipped"]
    text = f"{c['tests']} tests: {passed} passed, {bad} failed, {c['skipped']} skipped, {c['time']:.0f} s"
    if c["failed_names"]:
        text += "; failed: " + ", ".join(c["failed_names"][:8]) + (" ..." if len(c["failed_names"]) > 8 else "")
    ok = bad == 0 and c["tests"] > 0
    if args.all_must_run and c["skipped"]:
        ok = False
        text += "; skipped, but a GPU run must run them: " + "; ".join(c["skipped_names"][:4])
    if args.expect_skipped and passed:
        text += f"; {passed} ran without CUDA"
    return note(text, ok=ok)


# --- a training run ------------------------------------------------------------------------------------

FALL = 0.85
"""A run passes when its last logged training loss is below this fraction of its first (logged at step
1/30 of the run; Tiny Shakespeare starts near ln 65 = 4.17 nats and is near 2.5 after a few hundred steps)."""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_summary(run: Path, log: Path, eval_json: Path, sample: Path, device: str) -> tuple[dict, list[str]]:
    """What a run did and what is wrong with it, from its metrics.jsonl, its log, eval's JSON and a sample."""
    problems = []
    records = read_jsonl(run / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train" and "train/loss" in r]
    val = [r for r in records if r.get("kind") == "val"]
    s = {"run": run.name, "steps": train[-1]["step"] if train else 0}
    if len(train) < 2:
        problems.append(f"metrics.jsonl holds {len(train)} training loss records (need 2 or more)")
    else:
        first, last = train[0]["train/loss"], train[-1]["train/loss"]
        s.update(first_loss=first, last_loss=last, tokens_per_sec=train[-1].get("train/tokens_per_sec"))
        if not (math.isfinite(last) and last < FALL * first):
            problems.append(
                f"the training loss did not fall: {first:.3f} at step {train[0]['step']} -> {last:.3f} "
                f"at step {train[-1]['step']} (want below {FALL}x)"
            )
    if val:
        s["val_loss_during_training"] = val[-1].get("val/loss")
    text = log.read_text(errors="replace") if log.is_file() else ""
    m = re.search(r"\[s2moe\] world=(\d+) device=(\S+)", text)
    s["train_device"] = m.group(2) if m else None
    if not m or not m.group(2).startswith(device):
        problems.append(f"training ran on {m.group(2) if m else 'an unknown device'}, not {device}")
    if eval_json.is_file() and eval_json.read_text().strip():
        try:
            ev = json.loads(eval_json.read_text().strip().splitlines()[-1])
            s["eval_loss"], s["eval_tokens_per_sec"] = ev["loss"], ev["tokens_per_sec"]
            if not math.isfinite(ev["loss"]) or ("first_loss" in s and ev["loss"] >= s["first_loss"]):
                problems.append(f"eval loss {ev['loss']:.3f} is not below the first training loss")
        except (ValueError, KeyError) as e:
            problems.append(f"eval printed no result JSON ({e})")
    else:
        problems.append("eval printed nothing")
    sample_text = sample.read_text(errors="replace").strip() if sample.is_file() else ""
    s["sample"] = sample_text[:120]
    if len(sample_text) < 20:
        problems.append("sample printed under 20 characters")
    return s, problems


def run_step(args) -> int:
    s, problems = run_summary(Path(args.run), Path(args.log), Path(args.eval), Path(args.sample), args.device)
    Path(args.run, "check-summary.json").write_text(json.dumps({**s, "problems": problems}, indent=1))
    if "first_loss" in s:
        text = (
            f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['steps']} steps on {s['train_device']}; "
            f"eval {s.get('eval_loss', float('nan')):.3f} on {args.device}"
        )
    else:
        text = f"no training losses on {s.get('train_device')}"
    if problems:
        text += "; " + "; ".join(problems)
    return note(text, ok=not problems)


# --- versions ------------------------------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions(args) -> int:
    from importlib import metadata

    v = {"python": platform.python_version(), "host": platform.node()}
    smi = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        name, driver, memory = (x.strip() for x in smi.splitlines()[0].split(","))
        v.update(gpu=name, driver=driver, gpu_memory=memory)
    nvcc = _cmd(["nvcc", "--version"])
    m = re.search(r"release ([\d.]+)", nvcc)
    v["nvcc"] = m.group(1) if m else None
    try:
        import torch

        v["torch"] = torch.__version__
        v["torch_cuda"] = torch.version.cuda
        v["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            v["gpu_torch"] = torch.cuda.get_device_name()
            v["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
            v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # noqa: BLE001 - a report of what is there, whatever is broken
        v["torch"] = f"not importable ({e})"
    for dist in ("deepspeed", "megablocks", "grouped_gemm", "stanford-stk", "triton", "numpy", "pydantic", "pytest"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    try:
        import deepspeed

        v["deepspeed_path"] = str(Path(deepspeed.__file__).parent)
    except Exception as e:  # noqa: BLE001
        v["deepspeed_path"] = f"not importable ({type(e).__name__}: {e})"
    if args.kit and (Path(args.kit) / "kit.json").is_file():
        kit = json.loads((Path(args.kit) / "kit.json").read_text())
        v["kit_prepared"], v["kit_pins"] = kit["prepared"], kit["pins"]
    Path(args.out).write_text(json.dumps(v, indent=1))
    return 0


# --- the report ----------------------------------------------------------------------------------------


def md_table(rows: list[list], header: list[str]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def read_steps(work: Path) -> list[dict]:
    steps = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, status, seconds, text = (line.split("\t") + ["", "", ""])[:4]
        steps.append({"name": name, "status": status, "seconds": seconds, "note": text})
    return steps


def report(args) -> int:
    work, mode = Path(args.work), args.mode
    steps = read_steps(work)
    v = json.loads((work / "versions.json").read_text()) if (work / "versions.json").is_file() else {}
    failed = [s for s in steps if s["status"] == "FAIL"]
    out = []
    if mode == "dry":
        out += [
            "# GPU check report — DRY RUN on a CPU machine",
            "",
            "**Dry run (`gpu/check.sh --cpu-dry-run`): nothing here ran on a GPU.** Every step that needs CUDA is "
            "skipped, the rest ran on the CPU at tiny sizes to keep the check itself working.",
            "",
        ]
    else:
        out += ["# GPU check report", ""]
    skipped = [s["name"] for s in steps if s["status"] == "SKIP"]
    result = "FAILED: " + ", ".join(s["name"] for s in failed) if failed else "every step that ran passed"
    out += [
        f"- result: **{result}**" + (f"; skipped: {', '.join(skipped)}" if skipped else ""),
        f"- when: {args.started} (UTC), {args.seconds} s in all, on host `{v.get('host', '?')}`",
        f"- command: `{args.command}`",
        "",
    ]
    gpu = v.get("gpu") or v.get("gpu_torch") or "none (no CUDA device)"
    rows = [
        [
            "GPU",
            f"{gpu}"
            + (f", {v['gpu_memory']}" if v.get("gpu_memory") else "")
            + (f", compute capability {v['capability']}" if v.get("capability") else ""),
        ],
        ["NVIDIA driver", v.get("driver") or "—"],
        ["CUDA (torch built with / nvcc)", f"{v.get('torch_cuda') or '—'} / {v.get('nvcc') or '—'}"],
        ["NCCL", v.get("nccl") or "—"],
        ["Python", v.get("python", "?")],
        ["torch", v.get("torch", "?")],
        ["triton", v.get("triton") or "—"],
        ["DeepSpeed", f"{v.get('deepspeed') or 'not installed'} ({v.get('deepspeed_path', '')})"],
        ["MegaBlocks", v.get("megablocks") or "not installed"],
        ["grouped_gemm", v.get("grouped_gemm") or "not installed"],
        ["stanford-stk", v.get("stanford-stk") or "not installed"],
        ["pydantic", v.get("pydantic") or "—"],
        ["numpy", v.get("numpy") or "—"],
        ["pytest", v.get("pytest") or "—"],
        [
            "kit",
            f"prepared {v.get('kit_prepared', '?')}; pins "
            + ", ".join(f"{k} {ver}" for k, ver in v.get("kit_pins", {}).items()),
        ],
    ]
    out += ["## Versions", "", md_table(rows, ["", "version"]), ""]
    out += [
        "## Steps",
        "",
        md_table(
            [[s["name"], s["status"], s["seconds"], s["note"]] for s in steps], ["step", "result", "seconds", "note"]
        ),
        "",
    ]
    runs = sorted(work.glob("runs/*/check-summary.json"))
    if runs:
        rows = []
        for p in runs:
            s = json.loads(p.read_text())
            f = lambda k, fmt="{:.3f}": fmt.format(s[k]) if isinstance(s.get(k), (int, float)) else "—"
            rows.append(
                [
                    s["run"],
                    s.get("steps", 0),
                    f("first_loss"),
                    f("last_loss"),
                    f("val_loss_during_training"),
                    f("eval_loss"),
                    s.get("train_device") or "—",
                    f("tokens_per_sec", "{:,.0f}"),
                    "; ".join(s.get("problems", [])) or "ok",
                ]
            )
        out += [
            "## Training runs (Tiny Shakespeare, one process through the `deepspeed` launcher)",
            "",
            md_table(
                rows,
                [
                    "run",
                    "steps",
                    "first loss",
                    "last loss",
                    "val loss (training)",
                    "eval loss",
                    "device",
                    "train tokens/s",
                    "checks",
                ],
            ),
            "",
        ]
    bench = work / "bench.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        out += ["## Layer benchmark (`benchmarks/bench_moe_layer_gpu.py`)", ""]
        out += [r["markdown"] + "\n" for r in b["results"]]
    if failed:
        out += ["## Logs of the failed steps (last 40 lines each; every log is in check-logs.tar.gz)", ""]
        for s in failed:
            log = work / "logs" / f"{s['name']}.log"
            tail = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else ["(no log)"]
            out += [f"### {s['name']}", "", "```", *tail, "```", ""]
    Path(args.out).write_text("\n".join(out) + "\n")
    return 0


def summary(args) -> int:
    """check.json: the steps, versions, runs and benchmark numbers in one file for tools to read."""
    work = Path(args.work)
    load = lambda p: json.loads(p.read_text()) if p.is_file() else None
    Path(args.out).write_text(
        json.dumps(
            {
                "mode": args.mode,
                "seconds": args.seconds,
                "steps": read_steps(work),
                "versions": load(work / "versions.json") or {},
                "runs": [load(p) for p in sorted(work.glob("runs/*/check-summary.json"))],
                "bench": load(work / "bench.json"),
            },
            indent=1,
        )
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("verify-kit")
    p.add_argument("kit")
    p.add_argument("--python", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(fn=verify_kit)
    p = sub.add_parser("pytest")
    p.add_argument("junit")
    p.add_argument("--all-must-run", action="store_true", help="a skipped test fails the step (GPU run)")
    p.add_argument("--expect-skipped", action="store_true", help="say so when tests that need CUDA ran anyway")
    p.set_defaults(fn=pytest_step)
    p = sub.add_parser("run")
    p.add_argument("run")
    p.add_argument("--log", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--sample", required=True)
    p.add_argument("--device", required=True)
    p.set_defaults(fn=run_step)
    p = sub.add_parser("versions")
    p.add_argument("out")
    p.add_argument("--kit", default=None)
    p.set_defaults(fn=versions)
    p = sub.add_parser("report")
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--mode", choices=["gpu", "dry"], required=True)
    p.add_argument("--started", default="?")
    p.add_argument("--seconds", default="?")
    p.add_argument("--command", default="bash gpu/check.sh")
    p.set_defaults(fn=report)
    p = sub.add_parser("summary")
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--mode", choices=["gpu", "dry"], required=True)
    p.add_argument("--seconds", type=int, default=0)
    p.set_defaults(fn=summary)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
