"""Scaling measured on 2-4 simulated nodes, and the cost model (``lookahead_dist.plan``) checked against it.

For each cluster shape (nodes x ranks per node) and link rate, on the simulated cluster
(``tools/netcluster.py``, one network namespace per node, tbf-shaped links), with the real trainer
(``lookahead-dist train``):

1. the no-communication **ceiling** (local SGD with k larger than the run) ``--ceiling-reps`` times
   before the rows and again after them; its median step time is the model's compute time;
2. a **probe**: timed fp32 all-reduces of the whole model across the nodes
   (``benchmarks/workers/allreduce_probe.py``), from which the link's effective bandwidth is
   fitted (ring: ``2(N-1)/N * S / t``). The model is fitted on nothing else;
3. the **rows** (DDP, blocking local SGD, streaming int8 F=4), ``--reps`` times each, in one
   shuffled order.

Each row is reported as a fraction of the ceiling at the same shape (this host has 2 CPU cores,
so N ranks share them: compute slows with N, and only the ceiling at the same N isolates the cost
of communication), median [min-max] over repetitions, beside the model's prediction for the same
configuration. ``--straggler`` adds a shape whose last node has a link ``--straggler-factor``
times slower. Run as root::

    python -m benchmarks.scaling_measured --rates 200mbit --shapes 2x1,3x1,4x1,2x2 --write
    python -m benchmarks.scaling_measured --rates 200mbit --shapes 2x1 --reps 1 --ceiling-reps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import ROOT, cluster_unavailable, error_line, median_range, shuffled, trainer_exe, equalise_allocator

K = 16
DEFAULT_MODEL = "--layers 2 --d-model 256 --heads 4 --seq-len 64"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    args: tuple[str, ...]
    mode: str = "local_sgd"  # the plan.Option it is modelled as
    fragments: int = 1
    tau: int = 0
    wire: str = "fp32"
    eager: bool = False
    topk: float | None = None
    flat_hier: bool = False  # R > 1 without sharding: not what plan models (None predicted)


LS = ("--mode", "local-sgd", "--k", str(K))
ROWS = {
    "ddp": Row("ddp", "DDP (AdamW)", ("--mode", "ddp", "--no-lookahead"), mode="ddp"),
    "blocking": Row("blocking", f"blocking local SGD k={K}, fp32", LS),
    "stream-int8": Row("stream-int8", f"streaming k={K} F=4 tau=2, int8", (*LS, "--num-fragments", "4",
                       "--fragment-sync-delay", "2", "--comm-dtype", "int8"), fragments=4, tau=2, wire="int8"),
    # Top-k with R > 1 ranks per node: every local rank sends its whole fragment's payload across the
    # nodes (flat hierarchical), or its 1/R chunk's (hierarchical sharded, --local-sgd-sharded).
    "eager-sparse2": Row("eager-sparse2", f"eager k={K} F=4, top-2% int2, flat hierarchical",
                         (*LS, "--num-fragments", "4", "--eager-update", "--comm-dtype", "int2", "--topk-fraction",
                          "0.02"), fragments=4, wire="int2", eager=True, topk=0.02, flat_hier=True),
    "eager-sparse2-sharded": Row("eager-sparse2-sharded", f"eager k={K} F=4, top-2% int2, hierarchical sharded",
                                 (*LS, "--num-fragments", "4", "--eager-update", "--comm-dtype", "int2",
                                  "--topk-fraction", "0.02", "--local-sgd-sharded"), fragments=4, wire="int2",
                                 eager=True, topk=0.02),
}
CEILING = Row("ceiling", "no-communication ceiling", ("--mode", "local-sgd", "--k", "1000000"))


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, r = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes: a shape is NODESxRANKS, e.g. 2x1 or 2x2; got {text!r}") from None
    if n < 2 or r < 1:
        raise ValueError(f"--shapes: need >= 2 nodes and >= 1 rank per node, got {text!r}")
    return n, r


class Runner:
    """Jobs on one cluster: the trainer (one row, one repetition) and the all-reduce probe."""

    def __init__(self, cluster, per_node: int, args: argparse.Namespace, out_dir: Path, port: int) -> None:
        self.c, self.per_node, self.args, self.out_dir, self.port = cluster, per_node, args, out_dir, port

    def _next_port(self) -> int:
        self.port += 1
        self.c.master_port = self.port
        return self.port

    def train(self, row: Row, rep: int, steps: int) -> dict:
        from tools.netcluster import torchrun_argv

        port = self._next_port()
        ranks = self.c.nodes * self.per_node
        path = self.out_dir / f"{row.key}-{rep}-{port}.json"
        extra = ("--hierarchical",) if self.per_node > 1 and row.mode != "ddp" and row.key != "ceiling" else ()
        cmd = [trainer_exe(), "train", *row.args, *extra, *self.args.model.split(), "--steps", str(steps),
               "--batch-size", str(self.args.per_rank_batch * ranks), "--eval-batches", "1", "--device", "cpu",
               "--no-progress", "--json", str(path)]
        rec = {"key": row.key, "rep": rep, "steps": steps, "command": " ".join(["lookahead-dist", *cmd[1:-2]]),
               "load1": os.getloadavg()[0]}
        t0 = time.perf_counter()
        try:
            res = self.c.run(torchrun_argv(cmd, self.per_node), timeout=self.args.timeout)
            if path.exists():
                run = json.loads(path.read_text())["runs"][0]
                rec.update({k: run[k] for k in ("samples_per_s", "seconds", "comm_bytes_per_step", "params",
                                                "train_loss")})
                rec["wire_tx_bytes_per_step"] = run.get("wire_tx_bytes_per_step")  # node 0's link, measured
            else:
                bad = next((r for r in res if r.returncode != 0), res[0])
                rec["error"] = f"node {bad.node_rank} exit {bad.returncode}: {error_line(bad.output())[:300]}"
        except TimeoutError as e:
            rec["error"] = f"timeout: {e}"
        rec["job_seconds"] = time.perf_counter() - t0
        msg = rec.get("error") or f"{rec['samples_per_s']:.2f} samples/s"
        print(f"[{time.strftime('%H:%M:%S')} {self.c.nodes}x{self.per_node} {row.key} rep {rep}] {msg} "
              f"({rec['job_seconds']:.0f} s)", file=sys.stderr, flush=True)
        return rec

    def probe(self, numel: int) -> list[float]:
        """Seconds of an fp32 all-reduce of ``numel`` values across the nodes (one rank per node)."""
        from tools.netcluster import torchrun_argv

        self._next_port()
        out = self.out_dir / f"probe-{self.port}.json"
        cmd = [str(ROOT / "benchmarks" / "workers" / "allreduce_probe.py"), "--numel", str(numel), "--fragments", "1",
               "--dtypes", "fp32", "--reps", str(self.args.probe_reps), "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.c.run(torchrun_argv(cmd), timeout=self.args.timeout, env=env)
        return json.loads(out.read_text())["times"]["F=1 fp32"]


def run_shape(nodes: int, per_node: int, rate: str, args: argparse.Namespace, *, slow_node: bool,
              port: int) -> dict:
    from tools.netcluster import Cluster, parse_rate

    node_rates = {nodes - 1: parse_rate(rate) // args.straggler_factor} if slow_node else None
    label = f"{nodes}x{per_node}" + (f", node {nodes - 1} at 1/{args.straggler_factor}" if slow_node else "")
    out = {"nodes": nodes, "per_node": per_node, "rate": rate, "label": label, "straggler": slow_node,
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out_dir = Path(tempfile.mkdtemp(prefix="lkd-scaling-measured-"))
    with Cluster(nodes, rate, master_port=port, node_rates=node_rates) as c:
        run = Runner(c, per_node, args, out_dir, port)
        out["ceiling_before"] = [run.train(CEILING, r, args.steps) for r in range(args.ceiling_reps)]
        ok = [r for r in out["ceiling_before"] if "error" not in r]
        if not ok:
            out["error"] = f"ceiling failed: {out['ceiling_before'][0].get('error')}"
            return out
        out["probe"] = run.probe(ok[0]["params"])
        jobs = shuffled([k for k in args.rows], args.reps, seed=nodes * 10 + per_node)
        out["results"] = [run.train(ROWS[k], r, args.ddp_steps if k == "ddp" else args.steps) for k, r in jobs]
        out["ceiling_after"] = [run.train(CEILING, r, args.steps) for r in range(args.ceiling_reps)]
    return out


# -- the model's view -------------------------------------------------------------------------------
def _ceiling_runs(shape: dict) -> list[dict]:
    return [r for r in shape.get("ceiling_before", []) + shape.get("ceiling_after", []) if "error" not in r]


def fitted_link_bandwidth(shape: dict, params: int) -> float:
    """Bytes/s of one node's link, from the probe: ring all-reduce of ``4 * params`` bytes over N nodes."""
    n = shape["nodes"]
    t = statistics.median(shape["probe"])
    return 2.0 * (n - 1) / n * 4.0 * params / t


def predicted(shape: dict, row: Row) -> float | None:
    from lookahead_dist import plan as P

    ceil = _ceiling_runs(shape)
    if not ceil or not shape.get("probe"):
        return None
    params = ceil[0]["params"]
    step_time = statistics.median(r["seconds"] / r["steps"] for r in ceil)
    link = P.Link(fitted_link_bandwidth(shape, params), latency=1e-4)
    cluster = P.Cluster(nodes=shape["nodes"], link=link, ranks_per_node=shape["per_node"],
                        intra_link=P.Link(2e9, 1e-5))  # loopback inside a namespace node
    work = P.Workload(params=params, step_time=step_time)
    if row.mode == "ddp":
        option = P.Option(mode="ddp")
    else:
        if row.flat_hier and shape["per_node"] > 1:
            return None
        option = P.Option(k=K, num_fragments=row.fragments, fragment_sync_delay=row.tau, comm_dtype=row.wire,
                          eager_update=row.eager, topk_fraction=row.topk)
    return P.predict(option, work, cluster).utilization


def table(shapes: list[dict]) -> str:
    lines = ["| nodes x ranks | link | row | samples/s | measured / ceiling | predicted | measured - predicted (points) "
             "| wire MB/step (node 0) |",
             "|---|---|---|---|---|---|---|---|"]
    for sh in shapes:
        if "error" in sh:
            lines.append(f"| {sh['label']} | {sh['rate']} | failed: {sh['error']} | | | | | |")
            continue
        ceil = _ceiling_runs(sh)
        c = statistics.median(r["samples_per_s"] for r in ceil)
        lines.append(f"| {sh['label']} | {sh['rate']} | ceiling ({len(ceil)} runs, before and after) | "
                     f"{median_range([r['samples_per_s'] for r in ceil], '.1f')} | 1 | 1 | | |")
        for key in [k for k in ROWS if any(r["key"] == k for r in sh["results"])]:
            runs = [r for r in sh["results"] if r["key"] == key and "error" not in r]
            if not runs:
                err = next(r["error"] for r in sh["results"] if r["key"] == key)
                lines.append(f"| {sh['label']} | {sh['rate']} | {ROWS[key].label} | failed: {err[:120]} | | | | |")
                continue
            fr = [r["samples_per_s"] / c for r in runs]
            wire = [r["wire_tx_bytes_per_step"] / 1e6 for r in runs if r.get("wire_tx_bytes_per_step") is not None]
            pred = predicted(sh, ROWS[key])
            diff = "n/a" if pred is None else f"{100 * (statistics.median(fr) - pred):+.0f}"
            lines.append(f"| {sh['label']} | {sh['rate']} | {ROWS[key].label} | "
                         f"{median_range([r['samples_per_s'] for r in runs], '.1f')} | {median_range(fr, '.2f')} | "
                         f"{'n/a' if pred is None else f'{pred:.2f}'} | {diff} | {median_range(wire, '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="200mbit", help="comma-separated link rates (default 200mbit)")
    p.add_argument("--shapes", default="2x1,3x1,4x1,2x2", help="NODESxRANKS, comma-separated")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--straggler", action="store_true", help="also the first shape with its last node's link slower")
    p.add_argument("--straggler-factor", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ceiling-reps", type=int, default=2, help="ceiling runs before and again after the rows")
    p.add_argument("--probe-reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=64, help="steps of the local-SGD rows and the ceiling (k=16)")
    p.add_argument("--ddp-steps", type=int, default=16)
    p.add_argument("--per-rank-batch", type=int, default=2)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model flags of lookahead-dist train")
    p.add_argument("--timeout", type=float, default=600.0, help="per job, seconds")
    p.add_argument("--json-out", default=None)
    p.add_argument("--from-json", default=None, help="only format results saved with --json-out")
    p.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = p.parse_args(argv)
    args.rows = args.rows.split(",")
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"--rows: unknown {unknown}; rows: {', '.join(ROWS)}")
    for name in ("reps", "ceiling_reps", "probe_reps", "steps", "ddp_steps", "straggler_factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        shapes_wanted = [parse_shape(s) for s in args.shapes.split(",")]
    except ValueError as e:
        p.error(str(e))
    sys.path.insert(0, str(ROOT))

    if args.from_json:
        shapes = json.loads(Path(args.from_json).read_text())
    else:
        if (status := cluster_unavailable("scaling_measured")) is not None:
            return status
        equalise_allocator()  # every row under one malloc setting (benchmarks/_common.py)
        shapes, port = [], 30100
        for rate in args.rates.split(","):
            for n, r in shapes_wanted:
                shapes.append(run_shape(n, r, rate, args, slow_node=False, port=port))
                port += 200
            if args.straggler:
                n, r = shapes_wanted[0]
                shapes.append(run_shape(n, r, rate, args, slow_node=True, port=port))
                port += 200
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(shapes, indent=1))
    body = table(shapes)
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        params = next((_ceiling_runs(s)[0]["params"] for s in shapes if _ceiling_runs(s)), 0)
        note = (f"\n\nModel: the trainer's byte-level LM, {params / 1e6:.1f}M parameters (`{args.model}`), "
                f"{args.per_rank_batch} sequences per rank per step; local-SGD rows and the ceiling {args.steps} steps, "
                f"DDP {args.ddp_steps}. Shapes with 2 ranks per node run local SGD hierarchically (DDP inside a "
                "node). Each row: median [min-max] of its repetitions, as a fraction of the median ceiling "
                "of the same shape (the N ranks share this host's 2 cores, so compute slows with N). "
                "Predicted: `lookahead_dist.plan.predict` with the compute time of the ceiling runs and the "
                "link bandwidth fitted from the probe's fp32 all-reduce, nothing else (latency 0.1 ms, DDP "
                "overlap 2/3: the model's defaults). The model counts link time only; the sync's own CPU "
                "work (quantisation, the outer step), which on these shared cores costs points of its own "
                "(issue 16), is not in it.")
        write_section("Scaling: measured on 2-4 nodes, against the cost model",
                      f"python -m benchmarks.scaling_measured --rates {args.rates} --shapes {args.shapes} "
                      f"--reps {args.reps}{' --straggler' if args.straggler else ''} --write", body + note)
    return 0 if all("error" not in s for s in shapes) else 1


if __name__ == "__main__":
    sys.exit(main())
