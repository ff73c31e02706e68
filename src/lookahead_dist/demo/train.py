"""The per-rank training loop of the demo and the numbers it reports.

Runs inside an initialised process group (one process per rank). Returns, on every rank, the
same result dict (losses averaged over ranks, per-rank memory and traffic gathered), so that the
launcher can take it from any rank.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from ..memory import optimizer_state_bytes
from .commcount import CommCounter, interface_tx_bytes
from .config import RunConfig
from .data import load_corpus
from .model import TinyLM, lm_loss
from .modes import build_runner

__all__ = ["train_rank"]

# Train loss is reported as the mean over this many last (first) steps: a single batch is noisy.
_LOSS_WINDOW = 10
# Points kept of the loss curve.
_CURVE_POINTS = 25


def _device(run: RunConfig, rank: int) -> torch.device:
    if run.device == "cuda":
        # LOCAL_RANK: the rank on this node (set by our launcher and by torchrun).
        index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _progress(run: RunConfig, rank: int, enabled: bool | None, label: str) -> Any:
    if rank != 0 or enabled is False:
        return None
    from tqdm.auto import tqdm

    # enabled=None: show the bar only on a terminal (tqdm's disable=None).
    return tqdm(total=run.steps, desc=label, unit="step", file=sys.stderr, disable=None if enabled is None else False,
                dynamic_ncols=True, leave=True)


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def _evaluate(runner: Any, corpus: Any, run: RunConfig, rank: int, world: int, device: torch.device) -> float:
    runner.train(False)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(run.eval_batches):
            x, y = corpus.batch(i, run.batch_size, run.model.seq_len, rank, world, seed=run.seed, split="val")
            total += lm_loss(runner.logits(x.to(device)), y.to(device)).double()
    runner.train(True)
    return float(_mean_over_ranks(total / run.eval_batches))


def train_rank(rank: int, world: int, run: RunConfig, progress: bool | None = None, label: str | None = None) -> dict[str, Any]:
    """Train ``run`` on this rank; the result dict is identical on every rank."""
    if world != run.nproc:
        raise ValueError(f"run.nproc={run.nproc} but the process group has {world} ranks")
    device = _device(run, rank)
    corpus = load_corpus(run.corpus)
    torch.manual_seed(run.seed)  # same initial weights on every rank
    model = TinyLM(run.model).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    with CommCounter() as comm:
        runner = build_runner(model, run, device)
        with comm.paused():
            dist.barrier()
        comm.reset()  # set-up traffic (initial broadcasts, DeepSpeed's checks) is not per-step cost

        bar = _progress(run, rank, progress, label or run.name)
        # On the device: a per-step .item() would make every step wait for the GPU (issue 14);
        # the progress bar reads the window at its log points only.
        losses = torch.empty(run.steps, dtype=torch.float64, device=device)
        tx_start = interface_tx_bytes()
        start = time.perf_counter()
        for step in range(run.steps):
            x, y = corpus.batch(step, run.batch_size, run.model.seq_len, rank, world, seed=run.seed)
            loss = runner.step(x.to(device), y.to(device))
            losses[step] = loss.detach()
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == run.steps - 1:
                    bar.set_postfix(loss=f"{float(losses[max(0, step - 9):step + 1].mean()):.3f}", refresh=False)
        if runner.finish is not None:  # communication still in flight counts in the time
            runner.finish()
        waited = runner.waited() if runner.waited is not None else None
        with comm.paused():
            dist.barrier()
        seconds = time.perf_counter() - start
        tx_end = interface_tx_bytes()
        wire = None if tx_start is None or tx_end is None else tx_end - tx_start
        if bar is not None:
            bar.close()
        sent, payload, calls, by_op = comm.bytes, comm.payload, comm.calls, dict(comm.by_op)

        with comm.paused():
            if not torch.isfinite(losses).all():
                bad = int((~torch.isfinite(losses)).nonzero()[0])
                raise FloatingPointError(f"{run.name}: loss is not finite at step {bad} (lr={run.lr} too high?)")
            val_loss = _evaluate(runner, corpus, run, rank, world, device)
            # Local SGD's exported model: every rank's fast weights averaged and stepped once more
            # (sync_now, which also lands a streaming fragment still in flight). Runs of different
            # schedules compare fairly on it: the final weights above sit at different points of
            # each one's cycle.
            val_loss_synced = None
            if getattr(runner.optimizer, "local_sgd", None) is not None:
                runner.optimizer.sync_now()
                val_loss_synced = _evaluate(runner, corpus, run, rank, world, device)
            mean_losses = _mean_over_ranks(losses.to(device)).cpu()
            state = optimizer_state_bytes(runner.optimizer)
            per_rank: list[Any] = [None] * world
            dist.all_gather_object(per_rank, {"sent": sent, "payload": payload, "calls": calls, "by_op": by_op,
                                              "slow": state.slow, "state": state.total, "wire": wire,
                                              "waited": waited})

    window = min(_LOSS_WINDOW, run.steps)
    stride = max(1, math.ceil(run.steps / _CURVE_POINTS))
    curve = [[s + 1, round(float(mean_losses[max(0, s - stride + 1):s + 1].mean()), 4)]
             for s in range(stride - 1, run.steps, stride)]
    samples = run.steps * run.batch_size
    return {
        "name": run.name,
        "config": run.as_dict(),
        "device": device.type,
        "backend": dist.get_backend(),
        "world_size": world,
        "params": n_params,
        "train_loss_start": float(mean_losses[:window].mean()),
        "train_loss": float(mean_losses[-window:].mean()),
        "val_loss": val_loss,
        "val_loss_synced": val_loss_synced,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_s": samples * run.model.seq_len / seconds,
        # Per step and per rank; the max over ranks (ranks of a ZeRO host can differ slightly).
        "comm_bytes_per_step": max(r["sent"] for r in per_rank) / run.steps,
        "comm_payload_bytes_per_step": max(r["payload"] for r in per_rank) / run.steps,
        "comm_calls_per_step": max(r["calls"] for r in per_rank) / run.steps,
        "comm_bytes_by_op": {op: v / run.steps for op, v in per_rank[0]["by_op"].items()},
        # Measured at the network interface (GLOO_SOCKET_IFNAME, e.g. inside tools/netcluster.py's
        # nodes; bytes of all processes of the node), per step, max over ranks; None elsewhere.
        "wire_tx_bytes_per_step": (None if any(r["wire"] is None for r in per_rank)
                                   else max(r["wire"] for r in per_rank) / run.steps),
        # Host time blocked waiting for the sync's collectives (the exposed communication), per
        # step, max over ranks; None for set-ups that do not measure it.
        "wait_ms_per_step": (None if any(r["waited"] is None for r in per_rank)
                             else 1e3 * max(r["waited"] for r in per_rank) / run.steps),
        "slow_bytes_per_rank": [r["slow"] for r in per_rank],
        "optimizer_state_bytes_per_rank": [r["state"] for r in per_rank],
        "param_bytes": n_params * 4,
        "loss_curve": curve,
    }
