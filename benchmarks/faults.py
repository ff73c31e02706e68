"""Inject faults into a 2-rank local-SGD run and report what happened, the time lost and what was lost.

Faults (each on real gloo processes, a small MLP, ``Lookahead(AdamW, k=4)`` in local-SGD mode):

- ``nan``: rank 1's fast weights become NaN mid-cycle. Expected: at the next sync every rank sees
  the NaN in the averaged pseudo-gradient, skips the outer update, restores its fast weights
  from the slow weights and resets the inner state; one window of k steps is lost, the replicas
  stay identical, training goes on.
- ``overflow``: a GradScaler overflow on rank 1 only. Expected: rank 1 skips that inner step, both
  ranks still sync on the same ``step()`` call; nothing else is lost.
- ``hang``: rank 1 stops calling ``step()`` (sleeps) before a sync. Expected: rank 0 raises a clear
  error after ``LocalSGDOptions(timeout=...)`` seconds, naming the sync and the group.

Usage: ``python -m benchmarks.faults [--timeout 5]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks._common import spawn_and_collect

K = 4
STEPS = 12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))


def _batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * (rank + 1) + t)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _run(rank: int, n: int, fault: str, timeout: float) -> dict[str, Any]:
    from lookahead_dist import LocalSGDOptions, Lookahead

    model = _model()
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), k=K, alpha=0.5,
                    local_sgd=LocalSGDOptions(timeout=timeout))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6) if fault == "overflow" else None
    sync_times: list[float] = []
    out: dict[str, Any] = {"error": None}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(1, STEPS + 1):
            opt.zero_grad()
            x, y = _batch(rank, t)
            loss = F.mse_loss(model(x), y)
            if fault == "hang" and rank == 1 and t == 2 * K:
                time.sleep(timeout + 10)  # a peer that stops answering before the second sync
                return {"error": None, "hung": True}
            t0 = time.perf_counter()
            try:
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if rank == 1 and t == 2:
                        next(model.parameters()).grad[0, 0] = float("inf")
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
            except Exception as e:  # noqa: BLE001 - the fault's outcome is what we report
                out["error"] = f"{type(e).__name__}: {str(e)[:240]}"
                out["error_after_s"] = time.perf_counter() - t0
                return out
            if t % K == 0:
                sync_times.append(time.perf_counter() - t0)
            if fault == "nan" and rank == 1 and t == K + 2:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = float("nan")
    out.update(
        wall_s=time.perf_counter() - start,
        sync_ms=[round(1000 * s, 1) for s in sync_times],
        nonfinite_syncs=opt.nonfinite_syncs,
        finite=bool(torch.isfinite(_flat(model)).all()),
        checksum=float(_flat(model).double().sum()),
        warnings=[str(w.message)[:160] for w in caught if issubclass(w.category, RuntimeWarning)],
        scale=scaler.get_scale() if scaler is not None else None,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=5.0, help="LocalSGDOptions(timeout=...) in seconds")
    args = ap.parse_args(argv)
    rows = []
    for fault in ("none", "nan", "overflow", "hang"):
        r0, r1 = spawn_and_collect(_run, 2, fault, args.timeout, teardown=fault != "hang")
        rows.append((fault, r0, r1))
        print(f"[{fault}] rank0={r0}\n        rank1={r1}", flush=True)
    print("\n| fault | outcome on rank 0 | replicas identical | skipped outer updates | time |")
    print("|---|---|---|---|---|")
    for fault, r0, r1 in rows:
        if r0.get("error"):
            print(f"| {fault} | {r0['error']} | - | - | error after {r0['error_after_s']:.1f} s |")
            continue
        same = r0["checksum"] == r1["checksum"]
        print(f"| {fault} | trained {STEPS} steps, weights finite: {r0['finite'] and r1['finite']} | {same} | "
              f"{r0['nonfinite_syncs']} | {r0['wall_s']:.2f} s, syncs {r0['sync_ms']} ms |")


if __name__ == "__main__":
    main()
