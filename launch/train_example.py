"""A copy-paste starting point: Lookahead(AdamW) on a tiny regression model, under any launcher.

    python launch/train_example.py                                   # one process
    torchrun --nproc-per-node 2 launch/train_example.py              # DDP (launch/torchrun_*.sh)
    mpiexec -n 2 python launch/train_example.py                      # DDP, ranks from MPI
    accelerate launch --config_file launch/accelerate/ddp.yaml launch/train_example.py
    accelerate launch --config_file launch/accelerate/deepspeed.yaml launch/train_example.py
    ... --local-sgd                                                  # no per-step all-reduce

The data are synthetic and a function of (seed, step) only: step t's global batch is the same
whatever the launcher and world size, and rank r of W trains on rows [r*B/W, (r+1)*B/W). With
equal shards, DDP's mean of the ranks' mean gradients is the mean gradient of the whole batch,
so every data-parallel launch follows the one-process trajectory (up to rounding) and prints
the same ``checksum`` on its last line.

Flags: --steps --k --alpha --lr --batch --seed --local-sgd, and under accelerate
--save-dir DIR --save-at S (``accelerator.save_state`` after step S) and --resume DIR.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from lookahead_dist import Lookahead
from lookahead_dist.distributed import exit_process

IN, HIDDEN = 8, 32


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def global_batch(seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s whole batch: y = sin(x . w) + noise, from a generator seeded by (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, IN, generator=g)
    w = torch.linspace(-1.0, 1.0, IN)
    y = torch.sin(x @ w).unsqueeze(1) + 0.1 * torch.randn(batch, 1, generator=g)
    return x, y


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if t.shape[0] % world:
        raise ValueError(f"--batch {t.shape[0]} must be divisible by the world size {world}")
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def checksum(model: nn.Module) -> float:
    """A weighted sum of every weight in float64: any difference in any weight moves it."""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    return float((flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--k", type=int, default=5, help="Lookahead sync period")
    p.add_argument("--alpha", type=float, default=0.5, help="Lookahead slow step size")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=16, help="global batch (all ranks together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-sgd", action="store_true",
                   help="local-SGD mode: ranks train apart, Lookahead averages them every k steps")
    p.add_argument("--accelerate", action="store_true",
                   help="use accelerate (default when started by `accelerate launch`)")
    p.add_argument("--save-dir", help="accelerate: save_state here after step --save-at")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", help="accelerate: load_state from here and go on to --steps")
    return p.parse_args(argv)


def report(rank: int, model: nn.Module, args: argparse.Namespace, world: int) -> None:
    """Rank 0 prints the final weights' checksum and their loss on the last global batch."""
    if rank != 0:
        return
    x, y = global_batch(args.seed, args.steps, args.batch)
    p = next(model.parameters())
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(x.to(p.device, p.dtype)), y.to(p.device, p.dtype)).item()
    print(f"RESULT steps={args.steps} world={world} loss={loss:.6f} checksum={checksum(model):.12e}", flush=True)


def train_torch(args: argparse.Namespace) -> None:
    """torchrun, mpiexec or plain python: torch.distributed + DDP (or local SGD)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lookahead_dist.distributed import init_distributed

    rank, world = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(args.seed).to(device)
    # Local SGD trains the plain module (no per-step all-reduce); the optimizer aligns the ranks.
    net = model if args.local_sgd else DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=args.lr), k=args.k, alpha=args.alpha,
                    local_sgd=args.local_sgd and world > 1)
    for step in range(1, args.steps + 1):
        x, y = (shard(t, rank, world).to(device) for t in global_batch(args.seed, step, args.batch))
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report(rank, model, args, world)
    dist.destroy_process_group()


def train_accelerate(args: argparse.Namespace) -> None:
    """accelerate launch: plain data parallel or the DeepSpeed plugin, with save/load_state."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    import lookahead_dist.accelerate as la_acc

    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, no probing
        if deepspeed:
            from lookahead_dist.deepspeed import skip_cpu_shm_kernel

            skip_cpu_shm_kernel()
    # Without CUDA: data parallel runs as accelerate's MULTI_CPU (cpu=True, gloo); DeepSpeed
    # needs cpu=False and an explicit gloo backend (accelerate has no CPU default for it).
    accelerator = Accelerator(
        cpu=not cuda and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if not cuda and deepspeed else [],
    )
    rank, world = accelerator.process_index, accelerator.num_processes

    model = build_model(args.seed)
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if la_acc.lookahead_config(accelerator) is None:  # else the DeepSpeed config's "lookahead" block wraps it
        opt = Lookahead(opt, k=args.k, alpha=args.alpha, local_sgd=args.local_sgd and world > 1)
    model, opt = la_acc.prepare(accelerator, model, opt)

    start = 0
    if args.resume:
        accelerator.load_state(args.resume)
        start = args.save_at
    for step in range(start + 1, args.steps + 1):
        x, y = (shard(t, rank, world).to(accelerator.device) for t in global_batch(args.seed, step, args.batch))
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)  # under DeepSpeed this steps too; opt.step() is then a no-op
        opt.step()
        opt.zero_grad()
        if args.save_dir and step == args.save_at:
            accelerator.save_state(args.save_dir)
    report(rank, accelerator.unwrap_model(model), args, world)
    accelerator.end_training()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    use_accelerate = args.accelerate or "ACCELERATE_MIXED_PRECISION" in os.environ  # set by `accelerate launch`
    if (args.save_dir or args.resume) and not use_accelerate:
        sys.exit("--save-dir/--resume are shown with accelerate only; run under `accelerate launch` or add --accelerate")
    (train_accelerate if use_accelerate else train_torch)(args)


if __name__ == "__main__":
    main()
    exit_process(0)  # past gloo's teardown race at interpreter exit (lookahead_dist.distributed.exit_process)
