"""One job of ``benchmarks/deepspeed_nodes.py``: ZeRO across every rank, or ZeRO inside each node +
local SGD across nodes, on the simulated cluster (a torchrun worker).

One job per mode, 2 namespace nodes x 2 ranks (tools/netcluster.py, shaped links), DeepSpeed's CPU
accelerator over gloo, ZeRO-2, an MLP, AdamW (``torch_adam``), ``lookahead_dist.deepspeed.initialize``:

* ``zero-all``: ``"lookahead": {"k": K}``: DeepSpeed's data-parallel group is all 4 ranks; gradients
  cross the network at every step;
* ``nodes``: ``"lookahead": {"k": K, "local_sgd": {"across": "nodes"}}``: the node is DeepSpeed's
  group; only every K-th step sends each rank's partition to its peer on the other node.

Printed by global rank 0 as one ``RESULT {...}`` JSON line: seconds per step (after 2 warm-up steps),
bytes node 0's eth0 sent per step (all its processes), final loss. Run as root::

    python tools/netcluster.py --nodes 2 --rate 1gbit --torchrun --nproc-per-node 2 \\
        benchmarks/workers/deepspeed_job.py --mode nodes
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _tx_bytes() -> int | None:
    try:
        with open("/sys/class/net/eth0/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("zero-all", "nodes"), required=True)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from lookahead_dist.deepspeed import initialize, skip_cpu_shm_kernel

    skip_cpu_shm_kernel()
    rank = dist.get_rank()
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(args.width, 1))
    block: dict = {"k": args.k, "alpha": 0.5}
    if args.mode == "nodes":
        block["local_sgd"] = {"across": "nodes"}
    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "lookahead": block,
        "steps_per_print": 10**9,
    }
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(1000 + rank)
    w = torch.randn(args.width, 1, generator=torch.Generator().manual_seed(7)) / args.width**0.5
    losses = []
    t0 = tx0 = None
    for step in range(args.steps):
        if step == 2:
            dist.barrier()
            t0, tx0 = time.perf_counter(), _tx_bytes()
        x = torch.randn(args.batch, args.width, generator=g)
        loss = torch.nn.functional.mse_loss(engine(x), torch.sin(x @ w))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    dist.barrier()
    elapsed, tx1 = time.perf_counter() - t0, _tx_bytes()
    timed = args.steps - 2
    if rank == 0:
        params = sum(q.numel() for q in model.parameters())
        print("RESULT " + json.dumps({
            "mode": args.mode, "world": dist.get_world_size(), "k": args.k, "params": params,
            "s_per_step": elapsed / timed,
            "node0_tx_bytes_per_step": None if tx0 is None else (tx1 - tx0) / timed,
            "final_loss": sum(losses[-4:]) / 4,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
