"""Optimizer-state memory per rank under DeepSpeed ZeRO-1/2/3, against a naive replicated Lookahead.

For ZeRO stages 1, 2 and 3 at N=2 and N=4 gloo ranks on CPU (DeepSpeed's CPU accelerator), the
same 8-layer MLP as ``benchmarks/memory.py`` (about 8M fp32 parameters) takes one step of a
``Lookahead(AdamW, k=5, alpha=0.5)`` passed as the client optimizer to ``deepspeed.initialize``.
Each rank then measures, from the tensors in the Lookahead's state
(:func:`lookahead_dist.deepspeed.state_bytes`), the inner optimizer's state bytes and the
slow-weight bytes; the slow weights shadow the rank's fp32 master partition, so they are
``total / N`` plus DeepSpeed's alignment padding. The naive baseline is a full fp32 copy of the
model per rank.

Run: ``python -m benchmarks.memory_deepspeed`` (prints the table; ``--write`` merges the rows into
docs/benchmarks.md under "## Memory per rank", keyed by (host, N), beside the torch hosts' rows).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.memory import make_model, make_row, run_cli, spawn_and_collect

STAGES = (1, 2, 3)
LABELS = {1: "DeepSpeed ZeRO-1", 2: "DeepSpeed ZeRO-2", 3: "DeepSpeed ZeRO-3"}
COMMAND = "python -m benchmarks.memory --write && python -m benchmarks.memory_deepspeed --write"


def _rank_main(rank: int, n: int, port: int, out_dir: str, stages: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    import logging

    import deepspeed
    from deepspeed.utils import logger

    from lookahead_dist import Lookahead
    from lookahead_dist.deepspeed import lookahead_config, skip_cpu_shm_kernel, state_bytes

    logger.setLevel(logging.ERROR)
    skip_cpu_shm_kernel()  # only inference all-reduce uses that JIT-compiled op
    out = {}
    try:
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
            out[stage] = {"inner": b.inner, "slow": b.slow, "master": b.master}
            del engine, model, la
            gc.collect()
            dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def measure(world_sizes: tuple[int, ...] = (2, 4), stages: tuple[int, ...] = STAGES) -> list[dict[str, Any]]:
    total = sum(p.numel() for p in make_model().parameters())
    rows = []
    for n in world_sizes:
        per_rank = spawn_and_collect(_rank_main, n, list(stages))
        for s in stages:
            rows.append(make_row(LABELS[s], n, total, [pr[str(s)]["inner"] for pr in per_rank],
                                 [pr[str(s)]["slow"] for pr in per_rank], 4 * total))
    return rows


def main(argv: list[str] | None = None) -> None:
    run_cli(argv, __doc__.splitlines()[0], measure, COMMAND)


if __name__ == "__main__":
    main(sys.argv[1:])
