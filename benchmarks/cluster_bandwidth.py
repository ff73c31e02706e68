"""Effective bandwidth of a gloo all-reduce across the simulated cluster's shaped link.

For each configured rate, a 2-node cluster (tools/netcluster.py) runs a 2-node torchrun job that
all-reduces a float32 payload of P bytes ``iters`` times after a warm-up. A ring all-reduce over n
ranks sends ``2 (n - 1) / n * P`` bytes per rank, so with time t per call:

    algbw = P / t,   busbw = 2 (n - 1) / n * P / t   (= algbw for n = 2),

and busbw should approach the configured link rate less TCP/IP framing (about 3-5 % at MTU 1500).
The worker also reads eth0's tx_bytes inside its namespace around the timed loop, so the bytes that
actually crossed the link (headers included) are counted, not inferred.

Run (root): ``python -m benchmarks.cluster_bandwidth [--rates 100mbit,1gbit] [--write]``;
``--write`` puts the table in docs/benchmarks.md under "## Simulated cluster".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG = "LKD_BW_RESULT "


def worker(payload_mb: float, iters: int) -> None:
    """One rank: timed all-reduces of a rank-dependent payload; rank 0 prints a tagged JSON line.

    ``correct``: every element equals ``sum_r (r + 1) = n (n + 1) / 2`` after each all-reduce.
    """
    import torch
    import torch.distributed as dist

    from lookahead_dist.demo.commcount import interface_tx_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = int(payload_mb * 2**20) // 4
    x = torch.full((numel,), float(rank + 1))
    dist.all_reduce(x)  # warm-up: connections, TCP slow start
    expected = world * (world + 1) / 2
    ok = bool(torch.all(x == expected))
    dist.barrier()
    tx0, t0 = interface_tx_bytes(), time.perf_counter()
    for _ in range(iters):
        x.fill_(float(rank + 1))
        dist.all_reduce(x)
    elapsed = time.perf_counter() - t0
    # A rank's all-reduce returns once it has *received* everything; its own last bytes may still
    # sit in its egress queue. After a barrier the peer has finished too, so they have left.
    dist.barrier()
    tx1 = interface_tx_bytes()
    ok = ok and bool(torch.all(x == expected))
    # The slowest rank defines the collective's time.
    t = torch.tensor([elapsed])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        per_call = t.item() / iters
        payload = numel * 4
        result = {
            "world": world, "payload_bytes": payload, "iters": iters, "seconds_per_call": per_call,
            "algbw_bps": payload * 8 / per_call,
            "busbw_bps": 2 * (world - 1) / world * payload * 8 / per_call,
            "wire_tx_bps": None if tx0 is None or tx1 is None else (tx1 - tx0) * 8 / t.item(),
            "wire_tx_bytes_per_call": None if tx0 is None or tx1 is None else (tx1 - tx0) / iters,
            "correct": ok,
        }
        print(RESULT_TAG + json.dumps(result), flush=True)
    dist.destroy_process_group()


def measure(rate: str, *, nodes: int = 2, seconds_per_call: float = 0.5, iters: int = 4,
            timeout: float = 180.0) -> dict:
    """Build a cluster at ``rate``, run the worker under torchrun on every node, return rank 0's JSON."""
    sys.path.insert(0, str(ROOT))
    from tools.netcluster import Cluster, format_rate, parse_rate

    bps = parse_rate(rate)
    # Payload sized so one call takes about seconds_per_call at line rate (a whole number of MiB).
    payload_mb = max(1, round((bps or 10**9) / 8 * seconds_per_call / 2**20))
    script = str(Path(__file__).resolve())
    with Cluster(nodes, rate) as c:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "{nnodes}", "--nproc-per-node", "1",
               "--node-rank", "{node_rank}", "--master-addr", "{master_addr}", "--master-port", "{master_port}",
               script, "--worker", "--payload-mb", str(payload_mb), "--iters", str(iters)]
        results = c.run(cmd, timeout=timeout)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"node {failed[0].node_rank} failed at {rate}:\n{failed[0].output()[-3000:]}")
    line = next(ln for ln in results[0].output().splitlines() if ln.startswith(RESULT_TAG))
    out = json.loads(line[len(RESULT_TAG):])
    out.update(rate=format_rate(bps), rate_bps=bps, nodes=nodes)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| link (each direction) | payload | time per all-reduce | busbw | busbw / link | wire tx rate "
             "| wire / link | result correct |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        link = r["rate_bps"]
        wire = r["wire_tx_bps"]
        lines.append(
            f"| {r['rate']} | {r['payload_bytes'] / 2**20:g} MiB | {r['seconds_per_call'] * 1000:.0f} ms "
            f"| {r['busbw_bps'] / 1e6:.1f} Mbit/s | {100 * r['busbw_bps'] / link:.1f} % "
            f"| {'n/a' if wire is None else f'{wire / 1e6:.1f} Mbit/s'} "
            f"| {'n/a' if wire is None else f'{100 * wire / link:.1f} %'} | {r['correct']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100mbit,1gbit", help="comma-separated link rates")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--seconds-per-call", type=float, default=0.5)
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--payload-mb", type=float, default=8.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.payload_mb, args.iters)
        return 0

    sys.path.insert(0, str(ROOT))  # the driver imports tools/ and benchmarks/; the worker needs neither
    from benchmarks._common import cluster_unavailable, equalise_allocator

    if (status := cluster_unavailable("cluster_bandwidth")) is not None:
        return status
    equalise_allocator()  # every row under one malloc setting (benchmarks/_common.py)
    rows = []
    for rate in args.rates.split(","):
        r = measure(rate.strip(), seconds_per_call=args.seconds_per_call, iters=args.iters)
        print(json.dumps(r), flush=True)
        rows.append(r)
    body = table(rows)
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        command = ".venv/bin/python -m benchmarks.cluster_bandwidth " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
        load = os.getloadavg()[0]
        notes = (
            "\n\nRun as root. CPU only (no GPU), gloo, one rank per node. Two network-namespace nodes behind a "
            "bridge (`tools/netcluster.py`), each node's link shaped with tbf in both directions. "
            "busbw = 2(n-1)/n x payload / time (= payload / time for n = 2), time = slowest rank's. "
            "Wire tx is eth0's tx_bytes inside node 0's namespace over the timed loop; veth hands "
            "over GSO super-packets, so that counter holds about one header per 64 KiB, while tbf "
            "charges every 1500-byte segment's TCP/IP header (about 3-4 %): that framing is most "
            "of the gap between busbw and the link rate. The host was shared with other jobs "
            f"(load average {load:.1f} on {os.cpu_count()} cores at the end of the run), so the "
            "faster rows are lower bounds. This kernel has no sch_netem, so no latency was added "
            "(`--delay-ms` needs it).")
        write_section("Simulated cluster", command.strip(), body + notes)
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
