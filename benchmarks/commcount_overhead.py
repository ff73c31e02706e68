"""What counting the bytes costs a training step: the demo's byte counter against no counter and
against a dispatch mode that does nothing (the price every ``TorchDispatchMode``, torch's
``CommDebugMode`` included, pays per operator).

One process, one CPU thread, the streaming benchmark's model (``--layers 6 --d-model 256 --heads 8
--seq-len 64``, batch 2), Lookahead(AdamW). Each variant times ``--steps`` steps per repetition,
repetitions in shuffled order; median [min-max] ms per step and the ratio to "none" are printed.

    python -m benchmarks.commcount_overhead [--reps 7] [--steps 20] [--json-out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._common import median_range, shuffled
from lookahead_dist import Lookahead
from lookahead_dist.demo.commcount import _C10D_OPS, _FUNCTIONAL_OPS, CommCounter
from lookahead_dist.demo.model import ModelConfig, TinyLM, lm_loss


class _EmptyMode(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class _PreviousCounter(TorchDispatchMode):
    """The demo's counter before it moved to a dispatcher kernel (commit 60dddca): a dispatch mode
    that looks every operator up in the collective tables."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        packet = getattr(func, "_overloadpacket", None)
        if _C10D_OPS.get(packet) is None:
            _FUNCTIONAL_OPS.get(packet)
        return func(*args, **(kwargs or {}))


VARIANTS = {"none": nullcontext, "CommCounter": CommCounter, "empty TorchDispatchMode": _EmptyMode,
            "previous CommCounter (mode)": _PreviousCounter}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyLM(ModelConfig(n_layer=6, d_model=256, n_head=8, seq_len=64))
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-4), k=16, alpha=0.5)
    x, y = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))

    def step() -> None:
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        opt.step()

    for _ in range(5):  # warm-up
        step()
    ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name, _ in shuffled(VARIANTS, args.reps, seed=0):
        with VARIANTS[name]():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            ms[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    base = statistics.median(ms["none"])
    print(f"{'counter':<26} ms/step median [min-max]   ratio to none ({args.reps} reps x {args.steps} steps, shuffled)")
    rows = {}
    for name, v in ms.items():
        med = statistics.median(v)
        rows[name] = {"ms_per_step": med, "min": min(v), "max": max(v), "ratio": med / base, "runs": v}
        print(f"{name:<26} {median_range(v, '.2f'):<24} {med / base:.3f}")
    result = {"torch": torch.__version__, "reps": args.reps, "steps": args.steps, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
