"""Where a quantised local-SGD sync's CPU time goes on the caller's thread, by operator kind.

Two ranks on loopback (gloo, 1 thread each), ``Lookahead(SGD, k=4, local_sgd=...)`` over
``--tensors`` tensors of ``--numel`` fp32 elements (default 6 x 1M, the fragment of
``benchmarks/sync_cost.py --mode floor``), F=1 tau=1. Each round profiles ``--syncs`` sync cycles
with ``torch.profiler`` on rank 0 and sums the self CPU time per sync of: the compiled kernels
(``fused_kernels=True``), ``aten::copy_`` (the copies between per-parameter tensors and the wire's
block layout), ``aten::sub_`` (the progress) and everything else under ``Lookahead.step`` minus the
inner SGD step. The gradients are set outside the profile window's optimizer time (``normal_`` is
excluded). Median [min-max] over ``--rounds`` rounds::

    python -m benchmarks.sync_profile --comm-dtype int8 --fused --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

KINDS = ("compiled kernels", "copy_", "sub_ (progress)", "other sync work")


def _classify(events: Any) -> dict[str, float]:
    """Self CPU ms by kind over the profiled window."""
    out = dict.fromkeys(KINDS, 0.0)
    step = inner = 0.0
    for e in events:
        name, ms = e.key, e.self_cpu_time_total / 1e3
        if "CompiledFxGraph" in name:
            out["compiled kernels"] += ms
        elif name == "aten::copy_":
            out["copy_"] += ms
        elif name == "aten::sub_":
            out["sub_ (progress)"] += ms
        if name.startswith("Optimizer.step#Lookahead"):
            step = e.cpu_time_total / 1e3
        elif name.startswith("Optimizer.step#SGD"):
            inner = e.cpu_time_total / 1e3
    out["other sync work"] = max(0.0, step - inner - sum(out[k] for k in KINDS[:3]))
    return out


def _rank(rank: int, args: argparse.Namespace, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.profiler import ProfilerActivity, profile

    from lookahead_dist import LocalSGDOptions, Lookahead

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.numel)) for _ in range(args.tensors)]
    opts = LocalSGDOptions(comm_dtype=args.comm_dtype, fused_kernels=args.fused, fragment_sync_delay=1)
    opt = Lookahead(torch.optim.SGD(params, lr=0.01), k=4, local_sgd=opts)
    grads = [torch.randn_like(p) * 0.01 for p in params]

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    for _ in range(12):  # warm-up: compilation, the buffer pool, the first syncs
        step()
    rounds = []
    for _ in range(args.rounds):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(4 * args.syncs):
                step()
        rounds.append({k: v / args.syncs for k, v in _classify(prof.key_averages()).items()})
    if rank == 0:
        queue.put(rounds)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # torch 2.13's gloo can abort at interpreter finalization (docs/torchrun.md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--comm-dtype", default="int8", choices=("int8", "int4", "int2"))
    p.add_argument("--fused", action="store_true", help="LocalSGDOptions(fused_kernels=True)")
    p.add_argument("--numel", type=int, default=1 << 20)
    p.add_argument("--tensors", type=int, default=6)
    p.add_argument("--syncs", type=int, default=4, help="sync cycles (k=4 steps each) per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from benchmarks._common import equalise_allocator
    from lookahead_dist.distributed import free_port

    equalise_allocator()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    rounds = queue.get(timeout=900)
    for proc in procs:
        proc.join(timeout=60)
    print(f"{args.comm_dtype}{' fused' if args.fused else ''}, {args.tensors} x {args.numel} fp32 elements, "
          f"2 ranks, 1 thread each; CPU ms per sync on rank 0's caller thread, median [min-max] of "
          f"{args.rounds} rounds x {args.syncs} syncs\n")
    print("| kind | ms per sync |\n|---|---|")
    for kind in KINDS:
        xs = [r[kind] for r in rounds]
        print(f"| {kind} | {statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
