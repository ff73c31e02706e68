"""Single-process references for launch/train_example.py (the launcher tests compare against them).

- Data parallel (DDP, ZeRO, accelerate): one process on the whole global batch of each step.
- Local SGD over W ranks: W replicas in one process, each on its shard with its own AdamW; every
  k steps phi <- phi + alpha * (mean_i theta_i - phi) and every replica restarts from phi.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from launch.train_example import build_model, checksum, global_batch, shard
from lookahead_dist import Lookahead

RESULT = re.compile(r"RESULT steps=(\d+) world=(\d+) loss=(\S+) checksum=(\S+)")


def parse_result(output: str) -> float:
    """The checksum on the RESULT line of the example's output (exactly one such line)."""
    found = RESULT.findall(output)
    assert len(found) == 1, f"expected one RESULT line, got {len(found)} in:\n{output[-3000:]}"
    return float(found[0][3])


def data_parallel(steps: int = 12, k: int = 5, alpha: float = 0.5, lr: float = 1e-2, batch: int = 16,
                  seed: int = 0) -> float:
    model = build_model(seed)
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=lr), k=k, alpha=alpha)
    for step in range(1, steps + 1):
        x, y = global_batch(seed, step, batch)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return checksum(model)


def local_sgd(world: int, steps: int = 12, k: int = 5, alpha: float = 0.5, lr: float = 1e-2, batch: int = 16,
              seed: int = 0) -> float:
    base = build_model(seed)
    replicas = [copy.deepcopy(base) for _ in range(world)]
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in replicas]
    slow = [p.detach().clone() for p in base.parameters()]
    for step in range(1, steps + 1):
        x, y = global_batch(seed, step, batch)
        for r, (m, o) in enumerate(zip(replicas, opts)):
            loss = nn.functional.mse_loss(m(shard(x, r, world)), shard(y, r, world))
            o.zero_grad()
            loss.backward()
            o.step()
        if step % k == 0:
            with torch.no_grad():
                for i, s in enumerate(slow):
                    mean = torch.stack([list(m.parameters())[i] for m in replicas]).mean(0)
                    s.add_(alpha * (mean - s))
                    for m in replicas:
                        list(m.parameters())[i].copy_(s)
    return checksum(replicas[0])


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))
