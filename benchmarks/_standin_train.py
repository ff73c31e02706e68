"""Stand-in for ``lookahead-dist train`` until it exists: an MLP on synthetic data, DDP or local SGD.

Modes (one rank per process, gloo, launched by torchrun; a single process without torchrun works too):

* ``ddp``: DistributedDataParallel, gradients all-reduced every step.
* ``local-sgd``: each rank steps alone; every ``k`` steps the parameters are averaged, and a slow
  copy ``phi`` follows the average Lookahead-style: ``phi <- phi + alpha (mean_r theta_r - phi)``,
  ``theta_r <- phi`` (``alpha = 1`` is plain periodic averaging).

``zero2`` and ``fsdp2`` belong to the real trainer; the stand-in exits with status 3 for them so the
driver shows the row as unsupported rather than silently measuring something else.

Rank 0 prints one final JSON line::

    {"mode", "k", "alpha", "world", "params", "steps", "batch", "seconds", "samples_per_s",
     "allreduce_bytes_per_step", "wire_tx_bytes_per_step", "final_loss"}

``allreduce_bytes_per_step``: bytes handed to all-reduce per rank per timed step (counted in a DDP
comm hook / at each averaging); ``wire_tx_bytes_per_step``: the node interface's tx_bytes over the
timed steps per step (GLOO_SOCKET_IFNAME inside a cluster namespace; null elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from lookahead_dist.demo.commcount import interface_tx_bytes

SUPPORTED = ("ddp", "local-sgd")
ALL_MODES = ("ddp", "zero2", "fsdp2", "local-sgd")


def build_model(width: int, depth: int, in_dim: int, classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="stand-in trainer (MLP, synthetic data)")
    p.add_argument("--mode", default="ddp", choices=ALL_MODES)
    p.add_argument("--k", type=int, default=16, help="local-sgd: steps between averagings")
    p.add_argument("--alpha", type=float, default=1.0, help="local-sgd: slow-weight step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--in-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.mode not in SUPPORTED:
        print(f"_standin_train: mode {args.mode!r} needs the real trainer (lookahead-dist train); "
              f"the stand-in supports {', '.join(SUPPORTED)}", file=sys.stderr)
        return 3
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if not 0.0 < args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in (0, 1], got {args.alpha}")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:  # a lone process: a world of one
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # same initial weights on every rank
    classes = 10
    model = build_model(args.width, args.depth, args.in_dim, classes)
    teacher = torch.randn(args.in_dim, classes)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # each rank its own data
    n_params = sum(p.numel() for p in model.parameters())
    counted = [0]

    if args.mode == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)

        def counting_hook(state, bucket):  # count what DDP hands to all-reduce, then do it
            buf = bucket.buffer()
            counted[0] += buf.numel() * buf.element_size()
            return default_hooks.allreduce_hook(state, bucket)

        net.register_comm_hook(None, counting_hook)
    else:
        net = model
        slow = [q.detach().clone() for q in model.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def average(step: int) -> None:
        """Every k steps: mean of the ranks' weights, then the slow-weight step and reset."""
        if (step + 1) % args.k:
            return
        params = [q.data for q in model.parameters()]
        flat = torch.cat([q.reshape(-1) for q in params])
        counted[0] += flat.numel() * flat.element_size()
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for q, s in zip(params, slow):
            mean = flat[offset:offset + q.numel()].view_as(q)
            offset += q.numel()
            s.add_(mean - s, alpha=args.alpha)
            q.copy_(s)

    def train_step(step: int) -> float:
        x = torch.randn(args.batch, args.in_dim, generator=gen)
        y = (x @ teacher).argmax(dim=1)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if args.mode == "local-sgd":
            average(step)
        return loss.item()

    step = 0
    for _ in range(args.warmup):
        train_step(step)
        step += 1
    dist.barrier()
    counted[0] = 0
    tx0, t0 = interface_tx_bytes(), time.perf_counter()
    loss = float("nan")
    for _ in range(args.steps):
        loss = train_step(step)
        step += 1
    dist.barrier()
    elapsed = time.perf_counter() - t0
    tx1 = interface_tx_bytes()

    stats = torch.tensor([elapsed, loss])
    dist.all_reduce(stats[:1], op=dist.ReduceOp.MAX)
    loss_sum = stats[1:].clone()
    dist.all_reduce(loss_sum)
    seconds = stats[0].item()
    if rank == 0:
        out = {
            "mode": args.mode, "k": args.k if args.mode == "local-sgd" else None,
            "alpha": args.alpha if args.mode == "local-sgd" else None, "world": world, "params": n_params,
            "steps": args.steps, "batch": args.batch, "seconds": seconds,
            "samples_per_s": world * args.batch * args.steps / seconds,
            "allreduce_bytes_per_step": counted[0] / args.steps,
            "wire_tx_bytes_per_step": None if tx0 is None or tx1 is None else (tx1 - tx0) / args.steps,
            "final_loss": loss_sum.item() / world,
        }
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
