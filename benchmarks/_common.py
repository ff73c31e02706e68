"""What the benchmark scripts share: the repository root, the trainer's executable, the simulated
cluster's availability check, spawning gloo ranks on this machine and collecting what each rank
returns, repetitions in one shuffled order, and "median [min-max]" formatting.

Writing a result into docs/benchmarks.md is :mod:`benchmarks._docs`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Exit status of a cluster script on a host where the simulated cluster cannot be built
#: (the "skipped" status of automake-style test drivers).
NO_CLUSTER = 77


def cluster_unavailable(prog: str, hint: str = "") -> int | None:
    """``NO_CLUSTER`` after saying why on stderr when ``tools/netcluster.py`` cannot build a cluster
    here (not root, no ``ip``/``tc``, ...); None when it can."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tools.netcluster import unavailable_reason

    reason = unavailable_reason()
    if not reason:
        return None
    print(f"{prog}: cannot build a cluster on this host: {reason}{hint}", file=sys.stderr)
    return NO_CLUSTER


#: glibc malloc settings every row of a CPU benchmark runs under (the driver sets them in its own
#: environment, which every job inherits). Why: with glibc's defaults a process whose set-up never
#: allocated and freed large buffers keeps returning memory to the kernel and page-faults it back
#: at every step, so rows built on a bare ``torch.optim.AdamW`` (DDP, the peers) ran up to 1.5-1.8x
#: slower per step than rows whose set-up happened to warm the heap (issue 16). 32 MiB is the largest
#: mmap threshold glibc accepts; the trim threshold keeps freed heap memory in the process.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def equalise_allocator() -> str:
    """Put :data:`ALLOCATOR_ENV` into this process's environment (values already set win) and
    return it as ``NAME=value ...`` for the docs."""
    for k, v in ALLOCATOR_ENV.items():
        os.environ.setdefault(k, v)
    return " ".join(f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV)


def trainer_exe() -> str:
    """``lookahead-dist`` of this interpreter's environment, else the one on PATH."""
    exe = Path(sys.executable).parent / "lookahead-dist"
    return str(exe) if exe.exists() else (shutil.which("lookahead-dist") or "lookahead-dist")


_TORCHRUN_FAIL_RE = re.compile(r"^E\d{4} .*failed \(exitcode")


def error_line(text: str) -> str:
    """The worker's own last words: the line before torchrun's failure report, else the last line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if _TORCHRUN_FAIL_RE.match(ln) and i > 0:
            return lines[i - 1].strip()
    return lines[-1].strip() if lines else "(no output)"


# -- gloo ranks on this machine --------------------------------------------------------------------


def _rank_entry(rank: int, n: int, port: int, out_dir: str, body: Callable[..., dict[str, Any]],
                args: tuple, teardown: bool, env: dict[str, str]) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n), **env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        out = body(rank, n, *args)
    finally:
        if teardown:
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if not teardown:
        os._exit(0)  # the group may be broken (a hung peer): do not wait in its teardown


def spawn_and_collect(body: Callable[..., dict[str, Any]], n: int, *args: Any, teardown: bool = True,
                      env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``body(rank, n, *args)`` on ``n`` spawned processes, each in a gloo group of ``n`` ranks
    (one CPU thread each), and return what each rank's call returned (JSON), in rank order.

    ``body`` must be a module-level function (it is pickled). ``teardown=False`` skips
    ``destroy_process_group`` and ends the rank with ``os._exit`` once its result is written, for
    runs that leave the group broken on purpose."""
    import torch.multiprocessing as mp

    from lookahead_dist.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_entry, args=(n, free_port(), tmp, body, args, teardown, env or {}), nprocs=n, join=True)
        per_rank = []
        for r in range(n):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return per_rank


# -- repetitions and their summary -----------------------------------------------------------------


def shuffled(keys: Iterable[str], reps: int, seed: int = 0) -> list[tuple[str, int]]:
    """Every ``(key, repetition)`` pair, ``reps`` per key, in one order shuffled with ``seed``: the
    repetitions of different rows interleave, so a slow spell of the host hits several rows."""
    jobs = [(k, r) for k in keys for r in range(reps)]
    random.Random(seed).shuffle(jobs)
    return jobs


def median_range(xs: Sequence[float], fmt: str = ".3f", scale: float = 1.0) -> str:
    """``"median [min-max]"`` of ``xs`` (times ``scale``); one value alone; ``n/a`` for none."""
    v = [x * scale for x in xs]
    if not v:
        return "n/a"
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(statistics.median(v), fmt)} [{format(min(v), fmt)}-{format(max(v), fmt)}]"
