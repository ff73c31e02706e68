"""The in-place sync, non-finite guard included, against its foreach floor (issue 14, item 4).

The floor is what a sync cannot avoid: the inner SGD step, then ``_foreach_lerp_`` (slow weights)
and ``_foreach_copy_`` (fast <- slow) over the same tensors. ``Lookahead(SGD, k=1).step()`` does
that plus its non-finite guard (Note [A fast non-finite probe] in ``lookahead_dist._sync``) and its
bookkeeping. Target: at most 1.3x the floor, for both tensor shapes.

One repetition times ``--rounds`` calls of each function, interleaved call by call, and keeps the
median of each; ``--reps`` repetitions run in one shuffled order across shapes, each on freshly
built tensors. Reported: the median and range over repetitions of the per-repetition ratio.
Run::

    python -m benchmarks.sync_floor                 # 6 x 1M and 1500 x 256, 5 repetitions
    python -m benchmarks.sync_floor --write         # and update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lookahead_dist import Lookahead, _sync

from ._common import median_range, shuffled

SHAPES = {"6 x 1M": (6, 1 << 20), "1500 x 256": (1500, 256)}
TARGET = 1.3


def _params(count: int, numel: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(numel, generator=g)) for _ in range(count)]
    for p in ps:
        p.grad = torch.randn(numel, generator=g) * 1e-3
    return ps


def measure(count: int, numel: int, rounds: int, seed: int = 0) -> dict[str, float]:
    """Median milliseconds of the floor, the Lookahead step and the probe alone, over ``rounds``."""
    fp = _params(count, numel, seed)
    slow = [p.detach().clone() for p in fp]
    floor_opt = torch.optim.SGD(fp, lr=0.1, foreach=True)
    lp = _params(count, numel, seed)
    ours = Lookahead(torch.optim.SGD(lp, lr=0.1, foreach=True), k=1, alpha=0.5)

    def floor() -> None:
        floor_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(slow, fp, 0.5)
            torch._foreach_copy_(fp, slow)

    fast_list = [p.detach() for p in lp]
    cache: dict = {}  # as a bucket keeps it between syncs

    def probe() -> None:
        _sync.first_nonfinite(fast_list, cache)

    fns = {"floor": floor, "lookahead": ours.step, "probe": probe}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):  # warm-up: the first Lookahead step takes the slow weights
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="timed calls per function per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per shape, in one shuffled order")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--write", action="store_true", help="update the section in docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.rounds < 1:
        ap.error(f"--reps and --rounds must be >= 1, got {args.reps} and {args.rounds}")
    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SHAPES}
    for name, rep in shuffled(SHAPES, args.reps):
        m = measure(*SHAPES[name], args.rounds, seed=rep)
        results[name].append(m)
        print(f"rep {rep} {name}: floor {m['floor']:.2f} ms, Lookahead {m['lookahead']:.2f} ms "
              f"({m['lookahead'] / m['floor']:.2f}x), probe {m['probe']:.2f} ms", flush=True)
    rows = []
    for name, ms in results.items():
        ratios = [m["lookahead"] / m["floor"] for m in ms]
        verdict = "met" if statistics.median(ratios) <= TARGET else "missed"
        rows.append(f"| {name} | {median_range([m['floor'] for m in ms], '.2f')} | "
                    f"{median_range([m['lookahead'] for m in ms], '.2f')} | "
                    f"{median_range([m['probe'] for m in ms], '.2f')} | {median_range(ratios, '.2f')} | {verdict} |")
    table = "\n".join([
        "| tensors | floor (ms) | Lookahead in-place sync (ms) | non-finite probe alone (ms) | ratio | <= 1.3x |",
        "|---|---|---|---|---|---|", *rows])
    print(table)
    if args.write:
        from ._docs import write_section

        body = (f"The in-place sync (`Lookahead(SGD, k=1).step()`: the SGD step, the slow update and its "
                f"non-finite guard) against the floor any sync pays (the same SGD step, `_foreach_lerp_`, "
                f"`_foreach_copy_`), {args.threads} thread(s), {args.rounds} interleaved calls per "
                f"repetition, {args.reps} repetitions in shuffled order; median [range] over repetitions.\n\n"
                f"{table}\n")
        cmd = f"python -m benchmarks.sync_floor --reps {args.reps} --rounds {args.rounds} --threads {args.threads} --write"
        write_section("The in-place sync against its floor", cmd, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
