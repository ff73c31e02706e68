"""The DeepSpeed cluster rows, repeated: ``zero-all`` vs ``nodes`` (benchmarks/workers/deepspeed_job.py)
on 2 namespace nodes x 2 ranks, per link rate, each mode ``--reps`` times in shuffled order.

Prints median [min-max] seconds per step and node 0's bytes per step, and the speed-up of
``nodes`` over ``zero-all`` (ratio of medians, and the range of the per-repetition ratios of
runs adjacent in time). Run as root (network namespaces)::

    python -m benchmarks.deepspeed_nodes --rates 1gbit,100mbit --reps 3 --steps 34 [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    ROOT,
    cluster_unavailable,
    equalise_allocator,
    median_range,
    shuffled,
)

MODES = ("zero-all", "nodes")


def run_rate(rate: str, args: argparse.Namespace) -> dict:
    from tools.netcluster import Cluster, torchrun_argv

    jobs = shuffled(MODES, args.reps, args.seed)
    out = {"rate": rate, "order": [f"{m}#{r}" for m, r in jobs], "load_before": os.getloadavg()[0], "runs": []}
    log_dir = Path(tempfile.mkdtemp(prefix="lkd-dsnodes-"))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    with Cluster(2, rate, master_port=29900) as c:
        for mode, rep in jobs:
            cmd = [str(ROOT / "benchmarks" / "workers" / "deepspeed_job.py"), "--mode", mode, "--steps", str(args.steps),
                   "--k", str(args.k)]
            t0 = time.perf_counter()
            res = c.run(torchrun_argv(cmd, nproc_per_node=2), timeout=args.timeout, log_dir=log_dir / f"{mode}-{rep}",
                        env=env)
            line = next((l for r in res for l in r.output().splitlines() if l.startswith("RESULT ")), None)
            rec = {"mode": mode, "rep": rep, "job_s": time.perf_counter() - t0, "load1": os.getloadavg()[0]}
            if line is None:
                bad = next((r for r in res if r.returncode != 0), res[0])
                rec["error"] = f"node {bad.node_rank} exit {bad.returncode}: {bad.output()[-300:]}"
            else:
                rec.update(json.loads(line[len("RESULT "):]))
            print(f"[{rate} {mode}#{rep}] " + (rec.get("error") or
                  f"{rec['s_per_step']:.3f} s/step, node0 {rec['node0_tx_bytes_per_step'] / 1e6:.2f} MB/step, "
                  f"load {rec['load1']:.1f}"), flush=True)
            out["runs"].append(rec)
    return out


def report(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"2 namespace nodes x 2 ranks, DeepSpeed ZeRO-2 on its CPU accelerator over gloo, an MLP "
             f"(`benchmarks/workers/deepspeed_job.py` defaults: width 1024, 4 layers), AdamW, "
             f"k = {args.k}, {args.steps} steps per run "
             f"({args.steps - 2} timed after 2 warm-up steps), {args.reps} runs per mode in shuffled order; "
             "median [min-max]. Speed-up: ratio of the medians, and the range of the ratios of the runs paired in "
             "order of repetition.", "",
             "| link | mode | s/step | node 0 MB/step | speed-up of `nodes` |", "|---|---|---|---|---|"]
    for link in results:
        ok = {m: [r for r in link["runs"] if r["mode"] == m and "error" not in r] for m in MODES}
        for m in MODES:
            runs = ok[m]
            if not runs:
                lines.append(f"| {link['rate']} | `{m}` | failed | | |")
                continue
            sps = [r["s_per_step"] for r in runs]
            tx = [r["node0_tx_bytes_per_step"] for r in runs]
            speed = ""
            if m == "nodes" and ok["zero-all"]:
                za = sorted(ok["zero-all"], key=lambda r: r["rep"])
                nd = sorted(runs, key=lambda r: r["rep"])
                pairs = [a["s_per_step"] / b["s_per_step"] for a, b in zip(za, nd)]
                med = statistics.median(r["s_per_step"] for r in za) / statistics.median(sps)
                speed = f"{med:.2f}x [{min(pairs):.2f}-{max(pairs):.2f}]"
            lines.append(f"| {link['rate']} | `{m}` | {median_range(sps)} | {median_range(tx, '.2f', 1e-6)} | {speed} |")
        loads = [r["load1"] for r in link["runs"]]
        lines.append(f"| | load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="1gbit,100mbit")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=34)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json-out", default=None)
    p.add_argument("--from-json", default=None)
    p.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        if (status := cluster_unavailable("deepspeed_nodes")) is not None:
            return status
        equalise_allocator()  # every row under one malloc setting (benchmarks/_common.py)
        results = []
        for rate in args.rates.split(","):
            results.append(run_rate(rate, args))
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(results, indent=1))
    body = report(results, args)
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        write_section("DeepSpeed: ZeRO across all ranks vs ZeRO inside each node + local SGD across nodes",
                      f"python -m benchmarks.deepspeed_nodes --rates {args.rates} --reps {args.reps} "
                      f"--steps {args.steps} --k {args.k} --write", body)
    return 0 if all("error" not in r for l in results for r in l["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
