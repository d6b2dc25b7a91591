"""Expert parallelism on this machine, side by side in one run (the tiny S2MoE, same global batch):

    python benchmarks/bench_expert_parallel.py [--steps 20 --rounds 2]

- ep=1 on 1 process (2 micro-steps) vs ep=2 on 2 processes (1 micro-step each): median step time;
- the all-to-all time per step and its share of the step, from DeepSpeed's comms logger;
- S2MoE's fused single dispatch vs two dispatches (one all-to-all pair per pathway);
- DeepSpeed's padded dropless all-to-all vs ragged (variable-size, no padding: ``ep_mode=ragged``);
- one CPU thread per rank (what ``set_cpu_threads`` gives 2 ranks on 2 cores) vs two (oversubscribed).
Each configuration runs ``--rounds`` times, interleaved; the table shows the median over rounds.
Needs the built-in corpus prepared (``s2moe prepare --config configs/tiny.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import table  # noqa: E402

E4 = "model.moe.num_experts=4"
OVERSUBSCRIBED = {"OMP_NUM_THREADS": "2"}  # every rank takes both cores (what ranks did before set_cpu_threads)
CASES = {
    "ep=1, 1 process x 2 micro-steps": (1, ["model.moe.ep_size=1", "train.grad_accum=2", E4], {}),
    "experts replicated, 2 processes (data parallel)": (2, ["model.moe.ep_size=1", E4], {}),
    "ep=2, dropless (padded), fused dispatch": (2, ["model.moe.ep_size=2", E4], {}),
    "ep=2, ragged, fused dispatch": (2, ["model.moe.ep_size=2", "model.moe.ep_mode=ragged", E4], {}),
    "ep=2, dropless (padded), two dispatches": (
        2,
        ["model.moe.ep_size=2", E4, "model.moe.s2moe.fused_dispatch=false"],
        {},
    ),
    "data parallel, 2 threads per rank": (2, ["model.moe.ep_size=1", E4], OVERSUBSCRIBED),
    "ep=2, dropless (padded), 2 threads per rank": (2, ["model.moe.ep_size=2", E4], OVERSUBSCRIBED),
}


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(
    nproc: int, overrides: list[str], extra_env: dict, steps: int, data_dir: str, worker_args: tuple = ()
) -> dict:
    """One ``benchmarks/ep_worker.py`` run under the deepspeed launcher; its RESULT line as a dict."""
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(launcher),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(port()),
        str(REPO / "benchmarks/ep_worker.py"),
        "--steps",
        str(steps),
        *worker_args,
        "model.moe.backend=deepspeed",
        f"data.data_dir={data_dir}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(extra_env, PATH=f"{launcher.parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"benchmark case failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data-dir", default="data_cache/pydoc")
    args = ap.parse_args(argv)
    results = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, (nproc, overrides, extra_env) in CASES.items():
            results[name].append(run_worker(nproc, overrides, extra_env, args.steps, args.data_dir))
    rows = []
    base = statistics.median(r["step_s"] for r in results[next(iter(CASES))])
    for name, rs in results.items():
        step = statistics.median(r["step_s"] for r in rs)
        a2a = statistics.median(r["a2a_s"] for r in rs)
        calls = statistics.median(r["a2a_calls"] for r in rs)
        rows.append(
            [
                name,
                f"{step * 1e3:.1f}",
                f"{step / base:.2f}",
                f"{a2a * 1e3:.1f}",
                f"{100 * a2a / step:.0f}%",
                f"{calls:.0f}",
            ]
        )
    print(
        f"tiny S2MoE (configs/tiny.yaml, 2 MoE layers, 4 experts), global batch 16 x 64 tokens, "
        f"{args.steps} timed steps x {args.rounds} rounds\n"
    )
    print(
        table(
            rows, ["configuration", "step ms", "vs ep=1", "all-to-all ms/step", "all-to-all share", "all-to-alls/step"]
        )
    )


if __name__ == "__main__":
    main()
