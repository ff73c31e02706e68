"""Crash-and-resume recipe: periodic atomic checkpoints, restarted by torchrun after a kill -9.

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 launch/train_resumable.py \\
        --mode ddp --ckpt /tmp/ckpt --steps 20 --every 5
    ... --mode zero2        # DeepSpeed ZeRO-2, Lookahead as client optimizer, engine.save_checkpoint
    ... --mode local-sgd    # Lookahead(..., local_sgd=True): no per-step all-reduce
    ... --crash-at 12       # fault injection: rank 1 SIGKILLs itself after step 12, first attempt only

The recipe (docs/reliability.md, "Crash and resume"):

1. build the model, its wrapper and the optimizer exactly as for a fresh run;
2. ``start = load_latest(ckpt, model, opt)``: 0 on the first attempt, else the last saved step;
3. the batch of step t is a function of (seed, t) only, so steps start+1.. see the same data as
   the interrupted run did;
4. ``save_checkpoint(ckpt, model, opt, step)`` every ``--every`` steps (atomic: a rank killed
   mid-save leaves the previous checkpoint as the latest).

torchrun notices the dead rank, stops the others and starts every rank again (up to
``--max-restarts`` times); ``TORCHELASTIC_RESTART_COUNT`` tells a worker which attempt it is.
The run ends with the same weights, bit for bit, as one never interrupted. With ``--out DIR`` each
rank saves its final model and optimizer state to ``DIR/final_rank<r>.pt`` (the tests compare
them); ``--events`` prints timestamped EVENT lines (start, resume, crash, end) for timing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_example import build_model, global_batch, shard  # noqa: E402  (same data and model)

from lookahead_dist import Lookahead  # noqa: E402
from lookahead_dist.distributed import exit_process  # noqa: E402
from lookahead_dist.checkpointing import load_latest, save_checkpoint  # noqa: E402

MODES = ("ddp", "zero2", "local-sgd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, default="ddp")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (shared by all ranks)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--k", type=int, default=3, help="Lookahead sync period")
    p.add_argument("--alpha", type=float, default=0.5, help="Lookahead slow step size")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=16, help="global batch (all ranks together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crash-at", type=int, default=0,
                   help="fault injection: after this step, on the first attempt, rank --crash-rank kills "
                   "itself with SIGKILL (0: never)")
    p.add_argument("--crash-rank", type=int, default=1)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of simulated work per step")
    p.add_argument("--out", help="directory for each rank's final state (final_rank<r>.pt)")
    p.add_argument("--events", action="store_true", help="print timestamped EVENT lines")
    return p.parse_args(argv)


def event(args: argparse.Namespace, rank: int, what: str, **fields: object) -> None:
    if args.events:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"EVENT t={time.time():.3f} rank={rank} {what} {extra}".rstrip() + "\n"
        os.write(sys.stdout.fileno(), line.encode())  # one write: ranks sharing a pipe never interleave


def build(args: argparse.Namespace, rank: int, world: int):
    """(model to checkpoint, optimizer or None, step function(x, y), module whose weights are final)."""
    model = build_model(args.seed)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
        opt = Lookahead(inner, k=args.k, alpha=args.alpha)

        def step(x, y):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()

        return net, opt, step
    if args.mode == "local-sgd":
        # The plain module: no per-step all-reduce; the optimizer aligns the ranks' initial weights.
        opt = Lookahead(inner, k=args.k, alpha=args.alpha, local_sgd=True)

        def step(x, y):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        return model, opt, step
    import logging

    import deepspeed

    from lookahead_dist.deepspeed import lookahead_config, skip_cpu_shm_kernel

    deepspeed.utils.logger.setLevel(logging.ERROR)
    skip_cpu_shm_kernel()
    config = lookahead_config({
        "train_batch_size": args.batch,
        "train_micro_batch_size_per_gpu": args.batch // world,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    })
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=Lookahead(inner, k=args.k, alpha=args.alpha),
                                           config=config, dist_init_required=False)

    def step(x, y):
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()

    return engine, None, step


def final_state(args: argparse.Namespace, model, opt) -> dict:
    if args.mode == "zero2":
        from lookahead_dist.deepspeed import find_lookahead

        return {"model": model.module.state_dict(), "optimizer": find_lookahead(model).state_dict()}
    module = getattr(model, "module", model)
    return {"model": module.state_dict(), "optimizer": opt.state_dict()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode == "zero2" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, no probing
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import torch.distributed as dist

    from lookahead_dist.distributed import init_distributed

    rank, world = init_distributed()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    event(args, rank, "start", attempt=attempt)
    model, opt, step_fn = build(args, rank, world)
    event(args, rank, "built")
    start = load_latest(args.ckpt, model, opt)
    event(args, rank, "resumed", attempt=attempt, step=start)
    for step in range(start + 1, args.steps + 1):
        x, y = (shard(t, rank, world) for t in global_batch(args.seed, step, args.batch))
        step_fn(x, y)
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if step % args.every == 0:
            save_checkpoint(args.ckpt, model, opt, step)
            event(args, rank, "saved", step=step)
        if step == args.crash_at and attempt == 0 and rank == args.crash_rank:
            event(args, rank, "crash", step=step)
            os.kill(os.getpid(), signal.SIGKILL)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(final_state(args, model, opt), Path(args.out) / f"final_rank{rank}.pt")
    event(args, rank, "end", attempt=attempt)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # past gloo's teardown race at interpreter exit (lookahead_dist.distributed.exit_process)
