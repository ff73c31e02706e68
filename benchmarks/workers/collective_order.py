"""Do all ranks issue the same collectives in the same order? FSDP2 inside each replica + int8 streaming local SGD.

A torchrun worker (an even number of ranks). The ranks form a 2-D mesh ``(replicate=2,
shard=W/2)``: each replica is an FSDP2 model sharded over its ``shard`` ranks, and Lookahead runs
streaming local SGD across the ``replicate`` dimension (``LocalSGDOptions.from_mesh``: int8 on the
wire, F fragments, tau steps of overlap), while the training loop all-reduces its loss on the
default group every step -- the user's own collective that issue 14 (item 5) must not queue
behind a fragment. The flight recorder (``TORCH_FR_BUFFER_SIZE``, gloo and NCCL alike) records every collective of every process group; at the end each
rank dumps it and rank 0 checks:

- ``sequence``: for each process group, every member rank issued the same collectives (name,
  sizes, dtypes) in the same order -- a mismatch is a hang or a silent mix-up on any backend;
- ``interleave``: for each pair of groups two ranks share, the order in which the ranks issued
  their collectives across the two groups agrees. On NCCL a disagreement can deadlock (kernels of
  two communicators queued in opposite orders); gloo runs the quantised reduce on a worker
  thread, so there it is reported, not failed (``--strict-interleave`` fails it anywhere);
- ``replicas``: after ``sync_now()`` the replicas of each shard hold identical weights.

One PASS/FAIL line per check; exit 0 only if all pass. On the GPU machine (benchmarks/gpu.sh)::

    torchrun --standalone --nproc-per-node 4 benchmarks/workers/collective_order.py --backend nccl --out fr/

On CPU (tests/distributed/test_collective_order.py)::

    torchrun --standalone --nproc-per-node 4 benchmarks/workers/collective_order.py --backend gloo --out fr/
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The recorder is configured when a process group is built: before torch.distributed starts.
os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "20000")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="nccl" if torch.cuda.is_available() else "gloo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--fragments", type=int, default=2)
    p.add_argument("--delay", type=int, default=1, help="fragment_sync_delay (tau)")
    p.add_argument("--comm-dtype", default="int8")
    p.add_argument("--strict-interleave", action="store_true", help="fail an interleave mismatch on gloo too")
    p.add_argument("--out", required=True, help="folder for each rank's flight-recorder dump")
    return p.parse_args(argv)


def _train(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, nn.Module]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lookahead_dist import Lookahead, LocalSGDOptions

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)  # every replica starts from the same weights
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opts = LocalSGDOptions.from_mesh(mesh, across="replicate", comm_dtype=args.comm_dtype,
                                     num_fragments=args.fragments, fragment_sync_delay=args.delay)
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=args.k, local_sgd=opts)
    replica = mesh.get_local_rank("replicate")
    gen = torch.Generator().manual_seed(1000 + replica)  # replicas see different data, so they drift apart
    for _ in range(args.steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dist.all_reduce(loss.detach(), group=None)  # the user's own collective, every step
    opt.sync_now()
    return mesh, opt, model


def _replicas_equal(mesh: Any, model: nn.Module) -> float:
    """Largest difference between this rank's shards and the other replica's same shards."""
    group = mesh.get_group("replicate")
    worst = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        local = p.to_local().detach() if hasattr(p, "to_local") else p.detach()
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local.contiguous(), group=group)
        for g in gathered:
            worst = torch.maximum(worst, (g - local).abs().max() if local.numel() else worst)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _ops(dump: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(group name, op, sizes, dtypes) of every recorded collective, in the order this rank issued them."""
    entries = sorted(dump.get("entries", []), key=lambda e: e.get("record_id", 0))
    return [(str(e["process_group"][0]), e["profiling_name"].split(":")[-1], str(e.get("input_sizes")),
             str(e.get("input_dtypes"))) for e in entries if not e.get("is_p2p", False)]


def check(dumps: dict[int, dict[str, Any]], strict_interleave: bool) -> list[tuple[str, bool, str]]:
    """The sequence and interleave checks over every rank's dump: (name, passed, detail) each."""
    ops = {r: _ops(d) for r, d in dumps.items()}
    members: dict[str, list[int]] = {}
    for r, seq in ops.items():
        for g in dict.fromkeys(o[0] for o in seq):
            members.setdefault(g, []).append(r)
    out: list[tuple[str, bool, str]] = []
    bad = []
    for g, ranks in sorted(members.items()):
        seqs = {r: [o[1:] for o in ops[r] if o[0] == g] for r in ranks}
        first = seqs[ranks[0]]
        for r in ranks[1:]:
            if seqs[r] != first:
                i = next((i for i, (a, b) in enumerate(zip(first, seqs[r])) if a != b), min(len(first), len(seqs[r])))
                bad.append(f"group {g}: rank {ranks[0]} and rank {r} differ at collective #{i} "
                           f"({first[i] if i < len(first) else 'end'} vs {seqs[r][i] if i < len(seqs[r]) else 'end'})")
    total = sum(len(s) for s in ops.values())
    out.append(("sequence", not bad, bad[0] if bad else
                f"{len(members)} process groups, {total} collectives over {len(ops)} ranks, same order in every group"))
    mixed = []
    names = sorted(members)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(members[a]) & set(members[b]))
            if len(shared) < 2:
                continue
            orders = {r: [o[0] for o in ops[r] if o[0] in (a, b)] for r in shared}
            if len({tuple(v) for v in orders.values()}) > 1:
                mixed.append(f"groups {a} and {b} (ranks {shared})")
    out.append(("interleave", not mixed or not strict_interleave,
                (f"{len(mixed)} group pair(s) issued in different orders: {mixed[0]}" if mixed else
                 "every pair of groups issued in the same order on the ranks they share")
                + ("" if strict_interleave or not mixed else " (reported, not failed: not strict on this backend)")))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # the device_id= case of issue 14 item 7
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2 or world % 2:
        print(f"collective_order: needs an even number of ranks >= 2, got {world}", file=sys.stderr)
        return 2
    mesh, opt, model = _train(args, device)
    diff = _replicas_equal(mesh, model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.pkl").write_bytes(torch._C._distributed_c10d._dump_fr_trace(includeStackTraces=False))
    dist.barrier()
    code = 0
    if rank == 0:
        dumps = {r: pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)}
        strict = args.strict_interleave or args.backend == "nccl"
        results = check(dumps, strict)
        results.append(("replicas", diff == 0.0, f"max |difference| between replicas after sync_now: {diff:.3g}"))
        for name, ok, detail in results:
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        failed = [name for name, ok, _ in results if not ok]
        print(f"collective_order ({args.backend}, {world} ranks, {args.comm_dtype}, F={args.fragments} "
              f"tau={args.delay}, {args.steps} steps): {len(results) - len(failed)} passed, {len(failed)} failed",
              flush=True)
        code = 1 if failed else 0
    opt.close()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
