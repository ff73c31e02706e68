"""Throughput, scaling and bytes per step of the real trainer (``lookahead-dist train``) on the
simulated cluster (``tools/netcluster.py``): DDP, ZeRO-2, FSDP2 with and without Lookahead, local-SGD
Lookahead (k, sharded, bf16, hierarchical), torch ``PostLocalSGDOptimizer`` and accelerate
``LocalSGD``, each on 1/2/4 nodes (one rank per node unless the row says otherwise) behind a
``--rate`` link, same model, same per-rank batch (weak scaling: global batch = per-rank x ranks).

Columns (from the trainer's ``--json`` result of each job):

* samples/s: global samples per second over the training loop (every step, the first included);
* scaling efficiency: ``samples/s(N) / (N * samples/s(1))``, against the row's own 1-node run when
  there is one, else against DDP (AdamW) on 1 node (marked ``*``). On this 2-core host, 4 nodes are
  4 processes on 2 cores: perfect scaling is out of reach for compute reasons alone, so the table
  also shows each row against the **no-communication ceiling** at the same N (local SGD with k
  larger than the run: the same compute, no traffic);
* counted bytes/step: bytes each rank sends per step at the collective calls (ring estimate, max
  over ranks); wire bytes/step: tx_bytes of node 0's eth0 (all its processes) per step;
* slow weights/rank: Lookahead slow-weight bytes held by the largest rank;
* final loss: mean training loss of the last 10 steps (rows run different step counts: local SGD
  needs a multiple of k, so compare losses in the convergence section, not here).

Run as root (builds network namespaces)::

    python -m benchmarks.scaling --rate 1gbit --write
    python -m benchmarks.scaling --nodes 2 --rows ddp,local16 --steps-scale 0.25   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import (
    ROOT,
    cluster_unavailable,
    equalise_allocator,
    error_line,
    trainer_exe,
)


@dataclass(frozen=True)
class Spec:
    key: str
    label: str
    args: tuple[str, ...]
    steps: int
    nodes: tuple[int, ...] = (1, 2, 4)
    per_node: int = 1  # ranks per node (torchrun --nproc-per-node)


def _rows(host_steps: int, local_steps: int) -> list[Spec]:
    h, l = host_steps, local_steps
    la = ("--mode", "local-sgd")
    return [
        Spec("ddp", "DDP (AdamW)", ("--mode", "ddp", "--no-lookahead"), h),
        Spec("ddp-la", "DDP + Lookahead", ("--mode", "ddp"), h),
        Spec("zero2", "ZeRO-2 (AdamW)", ("--mode", "zero2", "--no-lookahead"), h, (2, 4)),
        Spec("zero2-la", "ZeRO-2 + Lookahead", ("--mode", "zero2"), h, (2, 4)),
        Spec("fsdp2", "FSDP2 (AdamW)", ("--mode", "fsdp2", "--no-lookahead"), h, (2, 4)),
        Spec("fsdp2-la", "FSDP2 + Lookahead", ("--mode", "fsdp2"), h, (2, 4)),
        Spec("local4", "local-SGD Lookahead k=4", (*la, "--k", "4"), l, (2, 4)),
        Spec("local16", "local-SGD Lookahead k=16", (*la, "--k", "16"), l),
        Spec("local64", "local-SGD Lookahead k=64", (*la, "--k", "64"), max(l, 64), (2, 4)),
        Spec("local16-sharded", "local-SGD k=16, sharded", (*la, "--k", "16", "--local-sgd-sharded"), l, (2, 4)),
        Spec("local16-bf16", "local-SGD k=16, bf16 comm", (*la, "--k", "16", "--comm-dtype", "bf16"), l, (2, 4)),
        Spec("local16-hier", "local-SGD k=16, hierarchical (2 ranks/node, DDP inside)",
             (*la, "--k", "16", "--hierarchical"), l, (2,), per_node=2),
        Spec("ceiling", "no-communication ceiling (local SGD, k > steps)", (*la, "--k", "1000000"), l, (2, 4)),
        Spec("torch-plsgd", "torch PostLocalSGDOptimizer k=16", ("--mode", "post-local-sgd", "--k", "16"), l, (2, 4)),
        Spec("accel-lsgd", "accelerate LocalSGD k=16", ("--mode", "accelerate-local-sgd", "--k", "16"), l, (2, 4)),
    ]


def run_all(specs: list[Spec], nodes: list[int], *, rate: str, model: list[str], per_rank_batch: int,
            timeout: float, echo: bool, port: int = 29700) -> list[dict]:
    from tools.netcluster import Cluster, torchrun_argv

    out_dir = Path(tempfile.mkdtemp(prefix="lkd-scaling-"))
    results: list[dict] = []
    for n in nodes:
        todo = [s for s in specs if n in s.nodes]
        if not todo:
            continue
        with Cluster(n, rate, master_port=port) as c:
            for s in todo:
                c.master_port = port
                port += 1
                ranks = n * s.per_node
                path = out_dir / f"{s.key}-{n}.json"
                cmd = [trainer_exe(), "train", *s.args, *model, "--steps", str(s.steps), "--batch-size",
                       str(per_rank_batch * ranks), "--eval-batches", "1",
                       "--device", "cpu", "--no-progress", "--json", str(path)]
                rec = {"key": s.key, "row": s.label, "nodes": n, "ranks": ranks, "steps": s.steps,
                       "command": " ".join(cmd[1:-2])}
                t0 = time.perf_counter()
                try:
                    res = c.run(torchrun_argv(cmd, s.per_node), timeout=timeout, echo=echo)
                    if path.exists():
                        rec.update(json.loads(path.read_text())["runs"][0])
                    else:
                        bad = next((r for r in res if r.returncode != 0), res[0])
                        rec["error"] = f"node {bad.node_rank} exit {bad.returncode}: {error_line(bad.output())[:300]}"
                except TimeoutError as e:
                    rec["error"] = f"timeout: {e}"
                rec["job_seconds"] = time.perf_counter() - t0
                results.append(rec)
                msg = rec.get("error") or (f"{rec['samples_per_s']:.2f} samples/s, "
                                           f"{rec['comm_bytes_per_step'] / 1e6:.2f} MB/step counted")
                print(f"[{s.label} @ {n} node(s)] {msg} ({rec['job_seconds']:.0f} s)", file=sys.stderr, flush=True)
    return results


def _mb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 1e6:.2f}"


def table(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    one = {r["key"]: r["samples_per_s"] for r in ok if r["ranks"] == 1}
    ceiling = {r["nodes"]: r["samples_per_s"] for r in ok if r["key"] == "ceiling"}
    ceiling[1] = one.get("ddp", ceiling.get(1))
    lines = ["| row | nodes x ranks | steps | samples/s | scaling eff. | vs ceiling | counted MB/step/rank "
             "| wire MB/step (node 0) | slow weights/rank (MB) | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        shape = f"{r['nodes']} x {r['ranks'] // r['nodes']}"
        if "error" in r:
            lines.append(f"| {r['row']} | {shape} | {r['steps']} | failed: {r['error']} | | | | | | |")
            continue
        base, star = (one[r["key"]], "") if r["key"] in one else (one.get("ddp"), "*")
        eff = f"{r['samples_per_s'] / (r['ranks'] * base):.2f}{star}" if base else "n/a"
        ceil = ceiling.get(r["nodes"]) if r["ranks"] == r["nodes"] else None
        vs = f"{r['samples_per_s'] / ceil:.2f}" if ceil else "n/a"
        slow = max(r["slow_bytes_per_rank"]) if r["config"]["optimizer"] == "lookahead" else None
        lines.append(f"| {r['row']} | {shape} | {r['steps']} | {r['samples_per_s']:.2f} | {eff} | {vs} "
                     f"| {_mb(r['comm_bytes_per_step'])} | {_mb(r.get('wire_tx_bytes_per_step'))} "
                     f"| {_mb(slow) if slow is not None else '-'} | {r['train_loss']:.3f} |")
    return "\n".join(lines)


def targets(results: list[dict]) -> str:
    """The issue's targets, met or not, per node count (numbers from the table)."""
    get = {(r["key"], r["nodes"]): r for r in results if "error" not in r}
    out = []
    for n in sorted({r["nodes"] for r in results if r["nodes"] > 1}):
        def sps(key: str) -> float | None:
            r = get.get((key, n))
            return r["samples_per_s"] if r else None

        def line(text: str, ok: bool | None) -> None:
            mark = "n/a" if ok is None else ("met" if ok else "NOT met")
            out.append(f"- {n} nodes: {text}: **{mark}**")

        d, l16, c = sps("ddp"), sps("local16"), sps("ceiling")
        if d and l16:
            line(f"local-SGD k=16 vs DDP samples/s = {l16 / d:.2f}x (target >= 3x)", l16 / d >= 3)
        if l16 and c:
            line(f"local-SGD k=16 vs no-communication ceiling = {l16 / c:.1%} (target >= 85%)", l16 / c >= 0.85)
        rd = get.get(("ddp", n))
        for k in (4, 16, 64):
            rl = get.get((f"local{k}", n))
            if rd and rl and rl["comm_bytes_per_step"] > 0:
                ratio = rl["comm_bytes_per_step"] / rd["comm_bytes_per_step"]
                line(f"bytes/step local-SGD k={k} / DDP = 1/{1 / ratio:.1f} (target 1/{k})",
                     abs(ratio * k - 1) < 0.05)
        sh = sps("local16-sharded")
        if sh and l16:
            line(f"sharded vs flat local-SGD k=16 samples/s = {sh / l16:.1%} (target within 5%)", sh / l16 >= 0.95)
        for host in ("zero2", "fsdp2"):
            a, b = sps(host), sps(f"{host}-la")
            if a and b:
                line(f"{host.upper()} + Lookahead vs {host.upper()} samples/s = {b / a:.1%} (target within 2%)",
                     b / a >= 0.98)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="1gbit", help="link rate per node and direction (default 1gbit)")
    p.add_argument("--nodes", default="1,2,4")
    p.add_argument("--rows", default=None, help="comma-separated row keys (default: all)")
    p.add_argument("--host-steps", type=int, default=8, help="steps of the rows that communicate every step")
    p.add_argument("--local-steps", type=int, default=32, help="steps of the local-SGD rows (k=64: at least 64)")
    p.add_argument("--per-rank-batch", type=int, default=2)
    p.add_argument("--model", default="--layers 7 --d-model 512 --heads 8 --seq-len 64",
                   help="model flags of lookahead-dist train (default: 22.2M parameters)")
    p.add_argument("--timeout", type=float, default=600.0, help="per job, seconds")
    p.add_argument("--json-out", default=None)
    p.add_argument("--from-json", default=None, help="only format results saved with --json-out")
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--echo", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        if (status := cluster_unavailable("scaling")) is not None:
            return status
        equalise_allocator()  # every row under one malloc setting (benchmarks/_common.py)
        specs = _rows(args.host_steps, args.local_steps)
        if args.rows:
            keys = args.rows.split(",")
            unknown = set(keys) - {s.key for s in specs}
            if unknown:
                p.error(f"unknown rows {sorted(unknown)}; rows: {', '.join(s.key for s in specs)}")
            specs = [s for s in specs if s.key in keys]
        nodes = [int(x) for x in args.nodes.split(",")]
        results = run_all(specs, nodes, rate=args.rate, model=args.model.split(), per_rank_batch=args.per_rank_batch,
                          timeout=args.timeout, echo=args.echo)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1))
    body = table(results) + "\n\nTargets of the issue:\n\n" + targets(results)
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        first = next((r for r in results if "error" not in r), None)
        params = f"{first['params'] / 1e6:.1f}M parameters, " if first else ""
        note = (f"\n\nModel: byte-level transformer LM of `lookahead-dist` ({params}`{args.model}`), "
                f"{args.per_rank_batch} sequences per rank per step, AdamW lr 3e-3, Lookahead k=5 alpha=0.5 "
                f"for the host rows. Link: {args.rate} per node and direction (tbf); this kernel has no "
                "sch_netem, so **no latency was added**. gloo on CPU. One rank per node except the "
                "hierarchical row. The host has 2 CPU cores: 4 nodes are 4 processes on 2 cores, so per-rank "
                "compute is about half as fast as with 1-2 nodes; 'vs ceiling' compares with the "
                "no-communication run at the same node count, which isolates the cost of communication. "
                "Timings include the first step; short runs, one repetition each, on a host shared with "
                "other jobs: differences of a few percent are noise. `*`: against DDP (AdamW) on 1 node. "
                "Exact per-row command: `lookahead-dist train <row flags> <model> --steps S --batch-size "
                f"{args.per_rank_batch}xN --nproc N` under `torchrun` on each node (see `benchmarks/scaling.py`).")
        rows = f" --rows {args.rows}" if args.rows else ""
        write_section(f"Throughput and scaling on the simulated cluster, {args.rate} links (real trainer)",
                      f"python -m benchmarks.scaling --rate {args.rate} --nodes {args.nodes}{rows} --write",
                      body + note)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
