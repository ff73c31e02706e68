"""Optimizer-state memory per rank under each torch host, against a naive replicated Lookahead.

For every host (DDP, ZeroRedundancyOptimizer, FSDP1 flat and orig params, FSDP2, HSDP) at N=2
and N=4 gloo ranks on CPU, an 8-layer MLP (about 8M fp32 parameters) takes one AdamW step inside a
:class:`lookahead_dist.Lookahead`; then each rank measures, from the tensors in its optimizer
state (:func:`lookahead_dist.memory.optimizer_state_bytes`), the inner optimizer's state bytes and
the slow-weight bytes. The naive baseline is what every Lookahead wrapper outside this project
keeps: a full fp32 copy of the model per rank, whatever the host.

Run: ``python -m benchmarks.memory`` (prints the table; ``--write`` puts it into
docs/benchmarks.md under "## Memory per rank").

Extending the table (e.g. ``benchmarks/memory_deepspeed.py``): build rows with :func:`make_row`
and call :func:`update_table`; rows are keyed by (host, N), so each script replaces only its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from lookahead_dist.distributed import free_port

TITLE = "Memory per rank"
WIDTH, DEPTH = 1000, 8  # 8 x (1000*1000 + 1000) = 8.0M parameters
HOSTS = ("ddp", "zero", "fsdp1", "fsdp1_orig", "fsdp2", "hsdp")
HOST_LABELS = {
    "ddp": "DDP",
    "zero": "torch ZeroRedundancyOptimizer",
    "fsdp1": "FSDP1 (use_orig_params=False)",
    "fsdp1_orig": "FSDP1 (use_orig_params=True)",
    "fsdp2": "FSDP2 fully_shard",
    "hsdp": "HSDP (2 x N/2 mesh)",
}
COLUMNS = ["host", "N", "params", "inner state / rank (MiB)", "slow weights / rank (MiB)",
           "naive replicated slow (MiB)", "slow vs naive", "Lookahead + inner / rank (MiB)",
           "naive Lookahead + inner / rank (MiB)"]
MIB = 2**20


# -- rows -------------------------------------------------------------------------------------------
def make_row(host: str, n: int, params: int, inner_bytes: list[int], slow_bytes: list[int],
             naive_slow_bytes: int) -> dict[str, Any]:
    """One table row from per-rank byte counts; per-rank columns show the largest rank."""
    slow, inner = max(slow_bytes), max(inner_bytes)
    return {
        "host": host,
        "N": n,
        "params": params,
        "inner_bytes": inner,
        "slow_bytes": slow,
        "naive_slow_bytes": naive_slow_bytes,
        "slow_vs_naive": slow / naive_slow_bytes,
        "total_bytes": max(i + s for i, s in zip(inner_bytes, slow_bytes)),
        "naive_total_bytes": inner + naive_slow_bytes,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["host"], str(r["N"]), f"{r['params'] / 1e6:.2f}M", f"{r['inner_bytes'] / MIB:.2f}",
                 f"{r['slow_bytes'] / MIB:.2f}", f"{r['naive_slow_bytes'] / MIB:.2f}",
                 f"{r['slow_vs_naive']:.3f}", f"{r['total_bytes'] / MIB:.2f}",
                 f"{r['naive_total_bytes'] / MIB:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, Any]]:
    """Rows back from a table written by :func:`format_table` (MiB values, so bytes are rounded)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(COLUMNS) or cells[0] in ("host", "") or set(cells[0]) <= {"-"}:
            continue
        try:
            rows.append({
                "host": cells[0], "N": int(cells[1]), "params": round(float(cells[2].rstrip("M")) * 1e6),
                "inner_bytes": round(float(cells[3]) * MIB), "slow_bytes": round(float(cells[4]) * MIB),
                "naive_slow_bytes": round(float(cells[5]) * MIB), "slow_vs_naive": float(cells[6]),
                "total_bytes": round(float(cells[7]) * MIB),
                "naive_total_bytes": round(float(cells[8]) * MIB),
            })
        except ValueError:
            continue
    return rows


def update_table(rows: list[dict[str, Any]], command: str) -> None:
    """Merge ``rows`` into the "## Memory per rank" table of docs/benchmarks.md; same (host, N) replaced."""
    from benchmarks._docs import DOC, write_section

    old: list[dict[str, Any]] = []
    if DOC.exists():
        m = re.search(rf"^## {re.escape(TITLE)}\n(.*?)(?=^## |\Z)", DOC.read_text(), re.S | re.M)
        if m:
            old = parse_table(m.group(1))
    keys = {(r["host"], r["N"]) for r in rows}
    merged = [r for r in old if (r["host"], r["N"]) not in keys] + rows
    body = (
        "Optimizer state held by the largest rank after one AdamW step inside `Lookahead(k=5, alpha=0.5)`, "
        "measured from the state tensors (local shards only) with "
        "`lookahead_dist.memory.optimizer_state_bytes`. *Naive replicated* is a full fp32 copy of the "
        "model on every rank, which is what a Lookahead that does not live in the optimizer state keeps "
        "under any host. gloo on CPU; the numbers are bytes, not timings.\n\n"
        + format_table(merged)
        + "\n\nZeroRedundancyOptimizer partitions whole parameters (greedy by size), so its ranks differ "
        "by up to one parameter; FSDP1 flat parameters are padded to a multiple of N; HSDP shards over "
        "the N/2 ranks of a replica and replicates across the 2 replicas.\n"
    )
    write_section(TITLE, command, body)


# -- measurement (one spawn per N, all hosts inside) ------------------------------------------------
def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])


def _build(host: str, n: int) -> tuple[nn.Module, Any, Any]:
    """(model, object to call step() on, Lookahead) for one host."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lookahead_dist import Lookahead

    model = make_model()
    if host == "ddp":
        model = DDP(model)
        la = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-3), k=5, alpha=0.5)
        return model, la, la
    if host == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = DDP(model)
        factory = Lookahead.wrap(torch.optim.AdamW, k=5, alpha=0.5)
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=factory, lr=1e-3)
        return model, zero, zero.optim
    if host.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FSDP(model, use_orig_params=host == "fsdp1_orig",
                     auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = (init_device_mesh("cpu", (n,)) if host == "fsdp2"
                else init_device_mesh("cpu", (2, n // 2), mesh_dim_names=("replicate", "shard")))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    la = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-3), k=5, alpha=0.5)
    return model, la, la


def _rank_main(rank: int, n: int, port: int, out_dir: str, hosts: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    from lookahead_dist.memory import optimizer_state_bytes

    out = {}
    try:
        for host in hosts:
            model, opt, la = _build(host, n)
            x = torch.randn(4, WIDTH)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            b = optimizer_state_bytes(la)
            out[host] = {"inner": b.inner, "slow": b.slow}
            del model, opt, la
            gc.collect()
            dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def spawn_and_collect(rank_main: Any, n: int, *args: Any) -> list[dict[str, Any]]:
    """Run ``rank_main(rank, n, port, out_dir, *args)`` on n processes; each writes rank{r}.json."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(n, free_port(), tmp, *args), nprocs=n, join=True)
        per_rank = []
        for r in range(n):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return per_rank


def measure(world_sizes: tuple[int, ...] = (2, 4), hosts: tuple[str, ...] = HOSTS) -> list[dict[str, Any]]:
    """Rows (see :func:`make_row`) for each host at each world size; HSDP needs N >= 4."""
    total = sum(p.numel() for p in make_model().parameters())
    naive = 4 * total
    rows = []
    for n in world_sizes:
        run = [h for h in hosts if not (h == "hsdp" and n < 4)]
        per_rank = spawn_and_collect(_rank_main, n, run)
        for h in run:
            rows.append(make_row(HOST_LABELS[h], n, total, [pr[h]["inner"] for pr in per_rank],
                                 [pr[h]["slow"] for pr in per_rank], naive))
    return rows


def run_cli(argv: list[str] | None, description: str, measure: Any, command: str) -> None:
    """The command line of the memory benchmarks: ``--world-sizes``, ``--write`` (rows into docs/benchmarks.md)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--write", action="store_true", help="merge the rows into docs/benchmarks.md")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = measure(tuple(args.world_sizes))
    print(format_table(rows))
    if args.write:
        update_table(rows, command)


def main(argv: list[str] | None = None) -> None:
    run_cli(argv, __doc__.splitlines()[0], measure, "python -m benchmarks.memory --write")


if __name__ == "__main__":
    main(sys.argv[1:])
