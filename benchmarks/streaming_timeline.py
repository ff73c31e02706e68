"""Draw the streaming local-SGD schedule as a timeline: docs/img/streaming-timeline.png.

The schedule is the library's own (:func:`lookahead_dist.sync.streaming.launch_fragment`); the
durations are illustrative: one inner step = 1 time unit, the blocking all-reduce of the whole
model = ``--allreduce`` units (default 3), a fragment's all-reduce = that / F.

    python -m benchmarks.streaming_timeline            # k=8, F=4, tau=1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lookahead_dist.sync.streaming import launch_fragment

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "streaming-timeline.png"
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def blocking_events(k: int, cycles: int, allreduce: float) -> tuple[list, list]:
    """(compute boxes, communication boxes) of the blocking sync: compute waits for each all-reduce."""
    compute, comm, t = [], [], 0.0
    for step in range(1, k * cycles + 1):
        compute.append((t, 1.0, step))
        t += 1.0
        if step % k == 0:
            comm.append((t, allreduce, 0))
            t += allreduce
    return compute, comm


def streaming_events(k: int, F: int, tau: int, cycles: int, allreduce: float) -> tuple[list, list, list]:
    """(compute boxes, fragment transfers, apply marks) of the streaming schedule; compute never waits
    as long as a fragment's transfer (allreduce / F) fits into tau steps."""
    compute, comm, applies = [], [], []
    frag_time = allreduce / F
    t, pending = 0.0, None
    for step in range(1, k * cycles + 1):
        compute.append((t, 1.0, step))
        t += 1.0
        n = (step - 1) % k + 1
        if pending is not None:
            pending[1] -= 1
            if pending[1] == 0:
                f, _, start = pending
                wait = max(0.0, start + frag_time - t)  # compute stalls only if the transfer is late
                t += wait
                applies.append((t, f))
                pending = None
        f = launch_fragment(n, k, F)
        if f is not None:
            comm.append((t, frag_time, f))
            if tau == 0:
                t += frag_time
                applies.append((t, f))
            else:
                pending = [f, tau, t]
    return compute, comm, applies


def draw(k: int, F: int, tau: int, cycles: int, allreduce: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 4.6), sharex=True)
    comp, comm = blocking_events(k, cycles, allreduce)
    for x, w, step in comp:
        a.broken_barh([(x, w * 0.96)], (1.1, 0.8), color="#bbbbbb")
        a.text(x + w / 2, 1.5, str((step - 1) % k + 1), ha="center", va="center", fontsize=7)
    for x, w, _ in comm:
        a.broken_barh([(x, w)], (0.1, 0.8), color=COLORS[0])
        a.text(x + w / 2, 0.5, "all-reduce\n(whole model)", ha="center", va="center", fontsize=7, color="white")
    a.set_yticks([0.5, 1.5], ["network", "compute"])
    a.set_title(f"blocking (F=1, tau=0): compute waits {allreduce:g} step-times every k={k} steps", fontsize=9)

    comp, comm, applies = streaming_events(k, F, tau, cycles, allreduce)
    for x, w, step in comp:
        b.broken_barh([(x, w * 0.96)], (F + 0.1, 0.8), color="#bbbbbb")
        b.text(x + w / 2, F + 0.5, str((step - 1) % k + 1), ha="center", va="center", fontsize=7)
    for x, w, f in comm:
        row = F - 1 - f
        b.broken_barh([(x, w)], (row + 0.1, 0.8), color=COLORS[f % len(COLORS)])
        b.plot([x], [row + 0.5], marker=">", color="black", markersize=4)
    for x, f in applies:
        row = F - 1 - f
        b.plot([x, x], [row + 0.05, F + 0.95], color=COLORS[f % len(COLORS)], linewidth=1.2, linestyle="--")
        b.plot([x], [row + 0.5], marker="o", color="black", markersize=4)
    b.set_yticks([F - 1 - f + 0.5 for f in range(F)] + [F + 0.5],
                 [f"fragment {f}" for f in range(F)] + ["compute"])
    b.set_title(f"streaming (k={k}, F={F}, tau={tau}): fragment f launched (>) at count f*k/F (fragment 0 at k), "
                f"applied (o, dashed) tau={tau} step(s) later", fontsize=9)
    b.set_xlabel("time, in inner-step times (numbers: the count n = 1..k of the unit)")
    for ax in (a, b):
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print("wrote", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--fragments", type=int, default=4)
    ap.add_argument("--delay", type=int, default=1)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--allreduce", type=float, default=3.0, help="whole-model all-reduce time, in step times")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    draw(args.k, args.fragments, args.delay, args.cycles, args.allreduce, args.out)


if __name__ == "__main__":
    main()
