"""Where a local-SGD sync's CPU time goes, step by step of the cycle: ``opt.step()`` and
forward+backward timed separately at each position ``t mod k``, median over the cycles after two
warm-up cycles, printed by rank 0. Run on two ranks (loopback, no shaping: the CPU cost alone)::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/sync_cost_per_step.py --num-fragments 2 --delay 3
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/sync_cost_per_step.py --num-fragments 4 --delay 2 --comm-dtype int4

The model is the streaming benchmark's (4.82M parameters, batch 2 x 64 tokens), Lookahead(AdamW),
k = 16. Compare a row with ``--k 1000000`` (no sync) for the cost of a step without one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from lookahead_dist import Lookahead, LocalSGDOptions
from lookahead_dist.demo.model import ModelConfig, TinyLM, lm_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--num-fragments", type=int, default=1)
    ap.add_argument("--delay", type=int, default=0)
    ap.add_argument("--comm-dtype", default=None, choices=(None, "bf16", "int8", "int4"))
    ap.add_argument("--cycles", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(n_layer=6, d_model=256, n_head=8, seq_len=64))
    cd = torch.bfloat16 if args.comm_dtype == "bf16" else args.comm_dtype
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-4), k=args.k, alpha=0.5,
                    local_sgd=LocalSGDOptions(num_fragments=args.num_fragments,
                                              fragment_sync_delay=args.delay, comm_dtype=cd))
    x, y = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))
    period = min(args.k, 16)
    fwd: dict[int, list[float]] = {}
    stp: dict[int, list[float]] = {}
    for t in range(period * args.cycles):
        t0 = time.perf_counter()
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if t >= 2 * period:
            fwd.setdefault(t % period, []).append(t1 - t0)
            stp.setdefault(t % period, []).append(t2 - t1)
    if dist.get_rank() == 0:
        what = f"k={args.k} F={args.num_fragments} tau={args.delay} wire={args.comm_dtype or 'fp32'}"
        print(f"{what}: forward+backward ms at t mod {period}:", " ".join(f"{1e3 * statistics.median(fwd[i]):.1f}" for i in range(period)))
        print(f"{what}: opt.step() ms at t mod {period}:      ", " ".join(f"{1e3 * statistics.median(stp[i]):.1f}" for i in range(period)))
        total = sum(statistics.median(fwd[i]) + statistics.median(stp[i]) for i in range(period))
        print(f"{what}: one cycle {1e3 * total:.0f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
