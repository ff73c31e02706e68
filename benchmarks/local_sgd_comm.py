"""Local-SGD mode against DDP: bytes at the collectives, time per step, slow-state memory per rank.

N gloo ranks on this machine train the same MLP on their own data with

- ``ddp``: DistributedDataParallel (gradient all-reduce every step; bytes counted by a comm hook);
- ``lsgd_k{k}``: ``Lookahead(SGD, k, alpha=0.5, local_sgd=True)`` on the plain module;
- ``sharded_k{k}``: the same with ``sharded=True`` (reduce-scatter + all-gather, 1/N slow state);
- ``bf16_k{k}``: the same with ``comm_dtype=torch.bfloat16``;
- ``diloco_k{k}``: ``outer_momentum=0.9, nesterov=True, alpha=0.7``.

Bytes are counted at the collective calls (``opt.local_sgd.stats``: payload, and the ring-model
wire bytes per rank); time is the median over rounds of the wall time of ``--steps`` steps.
On one machine gloo's "network" is shared memory, so the timings show the overhead, not the
savings a slow interconnect would give; the byte counts carry over. Run::

    python -m benchmarks.local_sgd_comm                       # 2 ranks, default sizes
    python -m benchmarks.local_sgd_comm --ranks 4 --hidden 1024 --k 8 --write
"""

from __future__ import annotations

import argparse
import statistics
import time


def _model(hidden: int, depth: int):
    import torch.nn as nn

    layers = [nn.Linear(64, hidden), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(hidden, 8))


def _body(rank: int, world: int, cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lookahead_dist import SLOW_KEY, Lookahead, LocalSGDOptions

    k, steps, rounds = cfg["k"], cfg["steps"], cfg["rounds"]
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(cfg["batch"], 64, generator=g), torch.randn(cfg["batch"], 8, generator=g))
            for _ in range(steps)]
    variants = {
        "ddp": None,
        f"lsgd_k{k}": LocalSGDOptions(),
        f"sharded_k{k}": LocalSGDOptions(sharded=True),
        f"bf16_k{k}": LocalSGDOptions(comm_dtype=torch.bfloat16),
        f"diloco_k{k}": LocalSGDOptions(outer_momentum=0.9, nesterov=True),
    }
    out = {}
    for name, opts in variants.items():
        torch.manual_seed(0)
        model = _model(cfg["hidden"], cfg["depth"])
        pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        counted = [0]
        if opts is None:
            model = DDP(model)

            def hook(state, bucket, counted=counted):
                counted[0] += bucket.buffer().numel() * bucket.buffer().element_size()
                return default_hooks.allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
        else:
            opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.01), k=k,
                            alpha=0.7 if "diloco" in name else 0.5, local_sgd=opts)
        times = []
        for _ in range(rounds):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for x, y in data:
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
            times.append((time.perf_counter() - t0) / steps)
        total_steps = rounds * steps
        if opts is None:
            payload, wire, slow = counted[0], counted[0] * 2 * (world - 1) / world, 0
        else:
            stats = opt.local_sgd.stats
            payload, wire = stats.total("payload", label="params"), stats.total("wire", label="params")
            slow = sum(st[SLOW_KEY].numel() * st[SLOW_KEY].element_size()
                       for st in opt.state.values() if SLOW_KEY in st)
        out[name] = {"ms": 1e3 * statistics.median(times), "payload": payload / total_steps,
                     "wire": wire / total_steps, "slow": slow, "param_bytes": pbytes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32, help="steps per round (a multiple of k)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    from tests.distributed._spawn import run_ranks

    cfg = vars(args)
    res = run_ranks(_body, world_size=args.ranks, args=(cfg,), timeout=1800)[0]
    pb = next(iter(res.values()))["param_bytes"]
    lines = [f"{args.ranks} gloo ranks, MLP {args.depth}x{args.hidden} ({pb / 2**20:.2f} MiB of fp32 "
             f"parameters), batch {args.batch}, k={args.k}; per step, rank 0.", "",
             "| variant | payload bytes/step | / param bytes | wire bytes/step (ring) | ms/step | slow bytes/rank |",
             "|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['payload']:.0f} | {r['payload'] / pb:.3f} | {r['wire']:.0f} | "
                     f"{r['ms']:.2f} | {r['slow']} |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        write_section("Local SGD: bytes and time per step", "python -m benchmarks.local_sgd_comm " +
                      " ".join(f"--{k} {v}" for k, v in cfg.items() if k != "write"), body)


if __name__ == "__main__":
    main()
