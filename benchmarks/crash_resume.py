"""Time lost to a kill -9 under torchrun, with launch/train_resumable.py's periodic checkpoints.

For each mode (DDP, DeepSpeed ZeRO-2, local SGD; 2 gloo ranks on this machine), ``--repeats``
times: one uninterrupted run and one where rank 1 SIGKILLs itself after step ``--crash-at`` (12)
of the first attempt, checkpoints every ``--every`` (5) steps, ``torchrun --max-restarts 1``. The
runs go one after another (not overlapped), and the table gives medians:

* wall: the whole ``torchrun`` command, uninterrupted and killed; time lost = their difference;
* kill -> restarted: from the kill to the restarted workers' process group being up (torchrun
  notices the dead rank, stops the other, rendezvous again, starts Python and torch);
* restarted -> resumed: building model, wrapper and optimizer again and ``load_latest``;
* redone steps: steps after the last checkpoint, trained twice;
* identical: both ranks' final model and optimizer state equal the uninterrupted run's bit for bit.

::

    python -m benchmarks.crash_resume --repeats 3
    python -m benchmarks.crash_resume --modes ddp --repeats 1 --step-sleep 0.2   # slower steps
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "train_resumable.py"
MODES = ("ddp", "zero2", "local-sgd")


def run(mode: str, root: Path, args: argparse.Namespace, crash: bool) -> tuple[float, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(SCRIPT), "--mode", mode, "--ckpt", str(root / "ckpt"), "--out",
           str(root / "out"), "--steps", str(args.steps), "--every", str(args.every), "--events",
           "--step-sleep", str(args.step_sleep)]
    if crash:
        cmd += ["--crash-at", str(args.crash_at)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return wall, proc.stdout + proc.stderr


def events(log: str) -> list[tuple[float, int, str, dict[str, str]]]:
    out = []
    for m in re.finditer(r"^EVENT t=(\S+) rank=(\d+) (\w+)((?: \w+=\S+)*)$", log, re.M):
        out.append((float(m.group(1)), int(m.group(2)), m.group(3), dict(kv.split("=", 1) for kv in m.group(4).split())))
    return out


def identical(a: Path, b: Path) -> bool:
    def eq(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return all(eq(torch.load(a / f"final_rank{r}.pt", weights_only=False),
                  torch.load(b / f"final_rank{r}.pt", weights_only=False)) for r in (0, 1))


def measure(mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, float | bool]:
    ref_wall, _ = run(mode, tmp / "ref", args, crash=False)
    wall, log = run(mode, tmp / "crash", args, crash=True)
    ev = events(log)
    t_kill = next(t for t, r, what, f in ev if what == "crash")
    t_restarted = min(t for t, r, what, f in ev if what == "start" and f["attempt"] == "1")
    t_resumed = max(t for t, r, what, f in ev if what == "resumed" and f["attempt"] == "1")
    resumed_at = next(int(f["step"]) for t, r, what, f in ev if what == "resumed" and f["attempt"] == "1")
    return {"ref_wall": ref_wall, "wall": wall, "lost": wall - ref_wall, "restart": t_restarted - t_kill,
            "resume": t_resumed - t_restarted, "redone": args.crash_at - resumed_at,
            "identical": identical(tmp / "ref" / "out", tmp / "crash" / "out")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--crash-at", type=int, default=12)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of simulated work per step")
    args = p.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"{args.steps} steps, checkpoint every {args.every}, kill -9 after step {args.crash_at}, "
          f"step sleep {args.step_sleep} s, {args.repeats} repeat(s), medians")
    print("| mode | wall, uninterrupted (s) | wall, killed once (s) | time lost (s) | kill -> restarted (s) "
          "| restarted -> resumed (s) | redone steps | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        rows = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                rows.append(measure(mode, args, Path(d)))
        med = {k: statistics.median(r[k] for r in rows) for k in ("ref_wall", "wall", "lost", "restart", "resume")}
        same = "yes" if all(r["identical"] for r in rows) else "NO"
        print(f"| {mode} | {med['ref_wall']:.1f} | {med['wall']:.1f} | {med['lost']:.1f} | {med['restart']:.1f} "
              f"| {med['resume']:.1f} | {rows[0]['redone']} | {same} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
