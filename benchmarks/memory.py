"""Optimizer-state memory per rank under each host, against a naive replicated Lookahead.

For every torch host (DDP, ZeroRedundancyOptimizer, FSDP1 flat and orig params, FSDP2, HSDP) and
DeepSpeed ZeRO-1/2/3 at N=2 and N=4 gloo ranks on CPU, an 8-layer MLP (about 8M fp32 parameters)
takes one AdamW step inside a :class:`lookahead_dist.Lookahead`; then each rank measures, from the
tensors in its optimizer state, the inner optimizer's state bytes and the slow-weight bytes
(:func:`lookahead_dist.memory.optimizer_state_bytes`; under DeepSpeed, where the Lookahead is the
client optimizer of ``deepspeed.initialize`` on its CPU accelerator,
:func:`lookahead_dist.deepspeed.state_bytes`: the slow weights shadow the rank's fp32 master
partition, so they are ``total / N`` plus DeepSpeed's alignment padding). The naive baseline is
what every Lookahead wrapper outside this project keeps: a full fp32 copy of the model per rank,
whatever the host.

Run: ``python -m benchmarks.memory`` (prints the table; ``--write`` merges the rows into
docs/benchmarks.md under "## Memory per rank", keyed by (host, N); ``--hosts torch`` or
``--hosts deepspeed`` measures one family only).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks._common import spawn_and_collect

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
STAGES = (1, 2, 3)  # DeepSpeed ZeRO stages
STAGE_LABELS = {1: "DeepSpeed ZeRO-1", 2: "DeepSpeed ZeRO-2", 3: "DeepSpeed ZeRO-3"}
COMMAND = "python -m benchmarks.memory --write"
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


def _torch_rank(rank: int, n: int, hosts: list[str]) -> dict[str, Any]:
    from lookahead_dist.memory import optimizer_state_bytes

    out = {}
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
    return out


def _deepspeed_rank(rank: int, n: int, stages: list[int]) -> dict[str, Any]:
    import logging

    import deepspeed
    from deepspeed.utils import logger

    from lookahead_dist import Lookahead
    from lookahead_dist.deepspeed import (
        lookahead_config,
        skip_cpu_shm_kernel,
        state_bytes,
    )

    logger.setLevel(logging.ERROR)
    skip_cpu_shm_kernel()  # only inference all-reduce uses that JIT-compiled op
    out = {}
    for stage in stages:
        model = make_model()
        la = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-3), k=5, alpha=0.5)
        cfg = lookahead_config({"train_batch_size": 2 * n, "train_micro_batch_size_per_gpu": 2,
                                "zero_optimization": {"stage": stage}, "steps_per_print": 10**9})
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=la, config=cfg)
        x = torch.randn(2, model[0].in_features)
        engine.backward(engine(x).square().mean())
        engine.step()
        b = state_bytes(engine)
        out[str(stage)] = {"inner": b.inner, "slow": b.slow, "master": b.master}
        del engine, model, la
        gc.collect()
        dist.barrier()
    return out


def measure(world_sizes: tuple[int, ...] = (2, 4), hosts: tuple[str, ...] = HOSTS) -> list[dict[str, Any]]:
    """Rows (see :func:`make_row`) for each torch host at each world size; HSDP needs N >= 4."""
    total = sum(p.numel() for p in make_model().parameters())
    naive = 4 * total
    rows = []
    for n in world_sizes:
        run = [h for h in hosts if not (h == "hsdp" and n < 4)]
        per_rank = spawn_and_collect(_torch_rank, n, run)
        for h in run:
            rows.append(make_row(HOST_LABELS[h], n, total, [pr[h]["inner"] for pr in per_rank],
                                 [pr[h]["slow"] for pr in per_rank], naive))
    return rows


def measure_deepspeed(world_sizes: tuple[int, ...] = (2, 4), stages: tuple[int, ...] = STAGES) -> list[dict[str, Any]]:
    """Rows for each DeepSpeed ZeRO stage at each world size (DeepSpeed's CPU accelerator)."""
    total = sum(p.numel() for p in make_model().parameters())
    rows = []
    for n in world_sizes:
        per_rank = spawn_and_collect(_deepspeed_rank, n, list(stages), env={"DS_ACCELERATOR": "cpu"})
        for s in stages:
            rows.append(make_row(STAGE_LABELS[s], n, total, [pr[str(s)]["inner"] for pr in per_rank],
                                 [pr[str(s)]["slow"] for pr in per_rank], 4 * total))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="merge the rows into docs/benchmarks.md")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hosts", default="torch,deepspeed",
                        help="comma-separated: torch (DDP, ZeRO, FSDP1/2, HSDP), deepspeed (ZeRO-1/2/3)")
    args = parser.parse_args(argv)
    families = args.hosts.split(",")
    if bad := set(families) - {"torch", "deepspeed"}:
        parser.error(f"--hosts: unknown {sorted(bad)}; choose from torch, deepspeed")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    if "torch" in families:
        rows += measure(tuple(args.world_sizes))
    if "deepspeed" in families:
        rows += measure_deepspeed(tuple(args.world_sizes))
    print(format_table(rows))
    if args.write:
        update_table(rows, COMMAND)


if __name__ == "__main__":
    main(sys.argv[1:])
