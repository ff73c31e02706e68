"""Time one fragment's all-reduce on the current process group, per wire format (a torchrun worker).

Started by ``benchmarks/streaming.py`` on every node of the simulated cluster, alone on the link
(no training running): for each fraction 1/F of the model's fp32 parameters and each wire format
(fp32, bf16: ``dist.all_reduce``; int8, int4: :func:`lookahead_dist._quant.quantized_all_reduce`,
the path of ``comm_dtype="int8"/"int4"``), one warm-up call, then ``--reps`` timed calls between
barriers. Rank 0 writes ``{"numel": P, "times": {"F=2 int8": [s, ...], ...}}`` to ``--out``.

    python -m torch.distributed.run ... benchmarks/workers/allreduce_probe.py --numel 6400000 --fragments 1,2,4 \\
        --dtypes fp32,bf16,int8,int4 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=int, required=True, help="parameters of the whole model")
    p.add_argument("--fragments", default="1,2,4")
    p.add_argument("--dtypes", default="fp32,bf16,int8,int4")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from lookahead_dist._quant import quantized_all_reduce

    group = dist.new_group(list(range(dist.get_world_size())))  # the quantised reduce's own group
    times: dict[str, list[float]] = {}
    for f in (int(x) for x in args.fragments.split(",")):
        n = args.numel // f
        for dt in args.dtypes.split(","):
            x = torch.randn(n, generator=torch.Generator().manual_seed(dist.get_rank()))
            if dt in ("fp32", "bf16"):
                buf = x if dt == "fp32" else x.to(torch.bfloat16)

                def once(buf: torch.Tensor = buf) -> None:
                    dist.all_reduce(buf)
            else:
                bits = {"int8": 8, "int4": 4}[dt]

                def once(x: torch.Tensor = x, bits: int = bits) -> None:
                    quantized_all_reduce(x, group, bits=bits, block_size=args.block_size)
            once()  # warm-up: connections, buffers
            ts = []
            for _ in range(args.reps):
                dist.barrier()
                t0 = time.perf_counter()
                once()
                ts.append(time.perf_counter() - t0)
            # The slower rank's time is the collective's time.
            t = torch.tensor(ts, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[f"F={f} {dt}"] = t.tolist()
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump({"numel": args.numel, "world": dist.get_world_size(), "times": times}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
