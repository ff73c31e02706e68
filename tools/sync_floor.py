"""The in-place sync against its foreach floor, on this CPU (issue 14, item 4).

The floor is what a sync cannot avoid: the inner SGD step, then ``_foreach_lerp_`` (slow weights)
and ``_foreach_copy_`` (fast <- slow) over the same tensors. ``Lookahead(SGD, k=1).step()`` does
that plus its non-finite guard (Note [A fast non-finite probe] in ``lookahead_dist._sync``) and its
bookkeeping; the ratio of the two medians is printed per tensor shape, rounds interleaved::

    OMP_NUM_THREADS=1 .venv/bin/python tools/sync_floor.py            # 6 x 1M and 1500 x 256
    OMP_NUM_THREADS=1 .venv/bin/python tools/sync_floor.py --rounds 60 --threads 2

Not a test (timings on a shared machine are noisy); it exits 0 and prints one line per shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lookahead_dist import Lookahead, _sync

SHAPES = ((6, 1 << 20), (1500, 256))


def _params(count: int, numel: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(numel, generator=g)) for _ in range(count)]
    for p in ps:
        p.grad = torch.randn(numel, generator=g) * 1e-3
    return ps


def measure(count: int, numel: int, rounds: int) -> dict[str, float]:
    fp = _params(count, numel, 0)
    slow = [p.detach().clone() for p in fp]
    floor_opt = torch.optim.SGD(fp, lr=0.1, foreach=True)
    lp = _params(count, numel, 0)
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
    for _ in range(3):  # warm-up
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for count, numel in SHAPES:
        m = measure(count, numel, args.rounds)
        print(f"{count} x {numel}: floor {m['floor']:.2f} ms, Lookahead in-place sync {m['lookahead']:.2f} ms "
              f"({m['lookahead'] / m['floor']:.2f}x the floor), probe alone {m['probe']:.2f} ms "
              f"(torch {torch.__version__}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
