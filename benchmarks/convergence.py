"""Convergence of the real trainer on two real tasks: loss against steps and against wall-clock.

Tasks (both byte-level next-token prediction with the demo's transformer, real text, no download):

* ``pydoc``: Python's documentation topics (prose), the main job's data;
* ``stdlib``: the interpreter's standard-library source code (the first 1 MB of its sorted
  top-level modules).

Runs, on ``--nproc`` local ranks (gloo, spawned by the demo's launcher), the same batches and
initial weights: DDP + AdamW, DDP + Lookahead(AdamW) (k=5, alpha=0.5), and local-SGD Lookahead
with k=16 and alpha in {0.5, 1.0} (1.0 = plain periodic averaging) and with Nesterov outer momentum
(alpha=0.7, beta=0.9, DiLoCo's outer step). Output: a table (final train/val loss, gap to DDP +
AdamW) and one PNG per task in ``docs/img/``. The wall-clock axis spreads the run's measured loop
time evenly over its steps (the trainer reports the total, not per-step times).

    python -m benchmarks.convergence --write

``--suite streaming``: streaming local SGD against the blocking mode (issue 9's convergence
target). Each row is one job of the real trainer (``lookahead-dist train``, two ranks), with
``--rate`` on the simulated cluster (``tools/netcluster.py``, two namespace nodes, one rank each;
run as root) so that the same runs give the loss-vs-wall-clock plot; ``--rate none`` spawns the
two ranks on this machine (the losses are the same, the network is not simulated). Rows: DDP +
AdamW; blocking local SGD (k=16, fp32); streaming (F fragments, tau=1) in fp32, int8, int4 with
and without error feedback. ``--seeds 0,1`` runs each row per seed (seed: initial weights, batch
order and the held-out batches); each streaming row is compared with the blocking row of the same
seed, and the blocking mode's seed-to-seed spread is the noise reference. Targets: streaming fp32
and int8 within 1 % of the blocking mode's validation loss, int4 within 2 %. ``--from-json``
merges the ``--json-out`` files of several invocations (e.g. one per seed) into one table and plot.

    python -m benchmarks.convergence --suite streaming --rate 200mbit --seeds 0,1 --write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import ROOT, cluster_unavailable, error_line, trainer_exe

IMG = ROOT / "docs" / "img"

RUNS = [  # label, RunConfig overrides
    ("DDP + AdamW", dict(mode="ddp", optimizer="adamw")),
    ("DDP + Lookahead(AdamW) k=5 a=0.5", dict(mode="ddp", optimizer="lookahead", k=5, alpha=0.5)),
    ("local-SGD k=16 a=1.0 (averaging)", dict(mode="local-sgd", k=16, alpha=1.0)),
    ("local-SGD k=16 a=0.5", dict(mode="local-sgd", k=16, alpha=0.5)),
    ("local-SGD k=16 a=0.7 Nesterov b=0.9", dict(mode="local-sgd", k=16, alpha=0.7, outer_momentum=0.9,
                                                 nesterov=True)),
]

# --suite streaming: (key, label, trainer flags, target: allowed relative val-loss excess over blocking
# seed 0, or None). `{F}` is --num-fragments.
_LSGD = ("--mode", "local-sgd", "--k", "{K}", "--alpha", "0.5")
STREAMING_ROWS = [
    ("ddp", "DDP + AdamW", ("--mode", "ddp", "--no-lookahead"), None),
    ("blocking", "blocking local SGD, fp32", _LSGD, None),
    ("stream-fp32", "streaming F={F} tau=1, fp32",
     (*_LSGD, "--num-fragments", "{F}", "--fragment-sync-delay", "1"), 0.01),
    ("stream-int8", "streaming F={F} tau=1, int8",
     (*_LSGD, "--num-fragments", "{F}", "--fragment-sync-delay", "1", "--comm-dtype", "int8"), 0.01),
    ("stream-int4", "streaming F={F} tau=1, int4",
     (*_LSGD, "--num-fragments", "{F}", "--fragment-sync-delay", "1", "--comm-dtype", "int4"), 0.02),
    ("stream-int4-noef", "streaming F={F} tau=1, int4, no error feedback",
     (*_LSGD, "--num-fragments", "{F}", "--fragment-sync-delay", "1", "--comm-dtype", "int4",
      "--no-error-feedback"), 0.02),
]
#: Rows drawn in the loss-vs-wall-clock plot of --suite streaming.
WALLCLOCK_ROWS = ("ddp", "blocking", "stream-fp32", "stream-int8")

# --suite slow-links (issue 16): the settings meant for 10-100 Mbit/s links against the same blocking
# fp32 reference. Eager rows: each sync's collective lands at the next sync (F fragments, tau = 0).
_EAGER = (*_LSGD, "--num-fragments", "{F}", "--eager-update")
SLOW_LINK_ROWS = [
    ("blocking", "blocking local SGD, fp32", _LSGD, None),
    ("stream-int4", "streaming F={F} tau=1, int4 (the best before)",
     (*_LSGD, "--num-fragments", "{F}", "--fragment-sync-delay", "1", "--comm-dtype", "int4"), 0.02),
    ("eager-fp32", "eager F={F}, fp32", _EAGER, 0.02),
    ("eager-int8", "eager F={F}, int8", (*_EAGER, "--comm-dtype", "int8"), 0.02),
    ("eager-int4", "eager F={F}, int4", (*_EAGER, "--comm-dtype", "int4"), 0.02),
    ("eager-int2", "eager F={F}, int2", (*_EAGER, "--comm-dtype", "int2"), 0.02),
    ("naive-int4", "naive delayed F={F}, int4", (*_LSGD, "--num-fragments", "{F}", "--eager-update", "naive",
                                                 "--comm-dtype", "int4"), 0.02),
    ("sparse-int2-2pct", "blocking, top-2% at 2 bits", (*_LSGD, "--comm-dtype", "int2", "--topk-fraction", "0.02"),
     0.02),
    ("eager-sparse-int2-2pct", "eager F={F}, top-2% at 2 bits", (*_EAGER, "--comm-dtype", "int2",
                                                                 "--topk-fraction", "0.02"), 0.02),
    ("eager-sparse-int2-3pct", "eager F={F}, top-3% at 2 bits", (*_EAGER, "--comm-dtype", "int2",
                                                                 "--topk-fraction", "0.03"), 0.02),
    # the wire formats alone (blocking, F=1), for the bits-per-parameter vs loss plot
    ("block-bf16", "blocking, bf16", (*_LSGD, "--comm-dtype", "bf16"), None),
    ("block-int8", "blocking, int8", (*_LSGD, "--comm-dtype", "int8"), None),
    ("block-int4", "blocking, int4", (*_LSGD, "--comm-dtype", "int4"), None),
    ("block-int2", "blocking, int2", (*_LSGD, "--comm-dtype", "int2"), None),
    ("sparse-int2-1pct", "blocking, top-1% at 2 bits", (*_LSGD, "--comm-dtype", "int2", "--topk-fraction", "0.01"),
     None),
    ("sparse-int2-3pct", "blocking, top-3% at 2 bits", (*_LSGD, "--comm-dtype", "int2", "--topk-fraction", "0.03"),
     None),
]
SUITES = {"streaming": STREAMING_ROWS, "slow-links": SLOW_LINK_ROWS}
#: Rows whose loss curves are drawn, per suite (the rest are in the tables and the bits plot).
_PLOTTED_CURVES = {"slow-links": {k for k, *_ in SLOW_LINK_ROWS if not k.startswith(("block-", "sparse-int2-1", "sparse-int2-3"))}}


def run(corpus: str, steps: int, batch: int, nproc: int) -> list[dict]:
    from lookahead_dist.demo.config import RunConfig
    from lookahead_dist.demo.launch import run_local
    from lookahead_dist.demo.train import train_rank

    out = []
    for label, over in RUNS:
        cfg = RunConfig(**{**dict(steps=steps, batch_size=batch, nproc=nproc, eval_batches=8, corpus=corpus), **over})
        res = run_local(train_rank, nproc, (cfg, False, label))
        res["label"] = label
        out.append(res)
        print(f"[{corpus}] {label}: train {res['train_loss']:.3f} val {res['val_loss']:.3f} "
              f"({res['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return out


def _plot_losses(curves: list[tuple[str, dict]], wallclock: set[str], path: Path, titles: tuple[str, str],
                 fontsize: int, legend_both: bool) -> None:
    """Loss vs steps (left) and vs wall-clock (right; the runs labelled in ``wallclock``), each run's
    loop time spread evenly over its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, r in curves:
        steps = [s for s, _ in r["loss_curve"]]
        loss = [v for _, v in r["loss_curve"]]
        a.plot(steps, loss, label=label)
        if label in wallclock:
            per_step = r["seconds"] / r["config"]["steps"]
            b.plot([s * per_step for s in steps], loss, label=label)
    a.set_xlabel("step")
    b.set_xlabel("wall-clock (s, loop time spread evenly over steps)")
    a.set_ylabel("training loss (nats/byte, mean over ranks)")
    a.set_title(titles[0])
    b.set_title(titles[1])
    for ax in (a, b) if legend_both else (a,):
        ax.legend(fontsize=fontsize)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(corpus: str, results: list[dict], path: Path) -> None:
    curves = [(r["label"], r) for r in results]
    _plot_losses(curves, {c[0] for c in curves}, path, (f"{corpus}: loss vs steps", f"{corpus}: loss vs wall-clock"),
                 8, legend_both=False)


def table(results: list[dict]) -> str:
    base = results[0]
    lines = ["| run | final train loss | val loss | val gap to DDP + AdamW | samples/s | comm MB/step/rank |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} "
                     f"| {r['val_loss'] - base['val_loss']:+.3f} | {r['samples_per_s']:.0f} "
                     f"| {r['comm_bytes_per_step'] / 1e6:.3f} |")
    return "\n".join(lines)


def run_streaming(rows: list[tuple], *, steps: int, batch: int, fragments: int, seeds: list[int],
                  rate: str | None, timeout: float = 1800.0, k: int = 16) -> list[dict]:
    """One trainer job per row, two ranks: on the simulated cluster at ``rate``, or spawned here."""
    out_dir = Path(tempfile.mkdtemp(prefix="lkd-convergence-"))
    # The trainer's corpus is `pydoc` (the first task here).
    common = ("--steps", str(steps), "--batch-size", str(batch), "--eval-batches", "8", "--device", "cpu",
              "--no-progress")
    results: list[dict] = []
    cluster = None
    if rate is not None:
        from tools.netcluster import Cluster

        cluster = Cluster(2, rate, master_port=29800)
        cluster.up()
    try:
        jobs = [(seed, row) for seed in seeds for row in rows]
        for i, (seed, (key, label, flags, target)) in enumerate(jobs):
            flags = tuple(a.replace("{F}", str(fragments)).replace("{K}", str(k)) for a in flags)
            label = label.replace("{F}", str(fragments))
            path = out_dir / f"{key}-seed{seed}.json"
            args = ("train", *flags, *common, "--seed", str(seed), *(() if cluster else ("--nproc", "2")))
            t0 = time.perf_counter()
            if cluster is not None:
                from tools.netcluster import torchrun_argv

                cluster.master_port = 29800 + i
                res = cluster.run(torchrun_argv([trainer_exe(), *args, "--json", str(path)]), timeout=timeout)
                failed = next((r for r in res if r.returncode != 0), None)
                error = None if failed is None else (f"node {failed.node_rank} exit {failed.returncode}: "
                                                     f"{error_line(failed.output())[:300]}")
            else:
                import subprocess

                done = subprocess.run([trainer_exe(), *args, "--json", str(path)], capture_output=True,
                                      text=True, timeout=timeout, check=False)
                error = None if done.returncode == 0 else (done.stderr or done.stdout).strip()[-300:]
            if error is not None or not path.exists():
                raise RuntimeError(f"{label}: {error or 'no result written'}")
            rec = json.loads(path.read_text())["runs"][0]
            rec.update(key=key, label=label, target=target, job_seconds=time.perf_counter() - t0,
                       command="lookahead-dist " + " ".join(args))
            results.append(rec)
            print(f"[{label}, seed {seed}] train {rec['train_loss']:.4f} val {rec['val_loss']:.4f} loop {rec['seconds']:.0f} s "
                  f"(job {rec['job_seconds']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.down()
    return results


def plot_streaming(results: list[dict], path: Path, rate: str | None) -> None:
    seed = min(r["config"]["seed"] for r in results)
    curves = [(r["label"], r) for r in results if r["config"]["seed"] == seed]
    link = f"{rate} link, 2 nodes" if rate else "2 local ranks, no simulated link"
    _plot_losses(curves, {r["label"] for r in results if r["key"] in WALLCLOCK_ROWS}, path,
                 (f"loss vs steps (seed {seed})", f"loss vs wall-clock ({link})"), 7, legend_both=True)


def bits_per_parameter(config: dict) -> float:
    """Bits on the wire per parameter per sync of a run's wire format (scales and indices included)."""
    from lookahead_dist._quant import scale_overhead
    from lookahead_dist._sparse import bits_per_parameter as sparse_bits

    wire = config["comm_dtype"]
    if config.get("topk_fraction"):
        return sparse_bits(config["topk_fraction"], int(wire[3:]))
    if wire in ("fp32", "bf16"):
        return 32.0 if wire == "fp32" else 16.0
    bits = int(wire[3:])
    return bits * (1 + scale_overhead(bits, config.get("quant_block_size", 512)))


def plot_bits_vs_loss(results: list[dict], path: Path) -> None:
    """Validation loss (relative to blocking fp32, per seed, then the mean) against bits per
    parameter per sync: blocking rows (F=1) and eager rows, one marker per wire format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {r["config"]["seed"]: r["val_loss"] for r in results if r["key"] == "blocking"}
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in results:
        c = r["config"]
        if c["seed"] not in base or c["fragment_sync_delay"]:
            continue
        kind = ("naive delayed" if c.get("eager_update") == "naive" else "eager" if c.get("eager_update")
                else "blocking")
        series.setdefault(kind, {}).setdefault(r["key"], []).append(
            (bits_per_parameter(c), r["val_loss"] / base[c["seed"]] - 1.0))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, marker in (("blocking", "o"), ("eager", "s"), ("naive delayed", "x")):
        pts = sorted((statistics.mean(b for b, _ in v), statistics.mean(g for _, g in v), min(g for _, g in v),
                      max(g for _, g in v), k) for k, v in series.get(kind, {}).items())
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [100 * p[1] for p in pts]
        err = [[100 * (p[1] - p[2]) for p in pts], [100 * (p[3] - p[1]) for p in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt=marker + ("-" if kind == "blocking" else ""), capsize=3, label=kind)
        for x, y, p in zip(xs, ys, pts):
            ax.annotate(p[4].replace("blocking", "fp32").replace("block-", "").replace("sparse-int2-", "top ").replace("pct", "%")
                        .replace("eager-", "").replace("naive-", "").replace("sparse-", "top2% "),
                        (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(2.0, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per parameter per sync (scales and indices included)")
    ax.set_ylabel("val loss vs blocking fp32 (%)")
    ax.set_title("wire format vs loss (mean of seeds, bars: min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def streaming_table(results: list[dict]) -> str:
    """One line per row: val loss per seed, the gap to the blocking row of the same seed, the mean gap
    over seeds against the target."""
    seeds = sorted({r["config"]["seed"] for r in results})
    by = {(r["key"], r["config"]["seed"]): r for r in results}
    keys = list(dict.fromkeys(r["key"] for r in results))
    head = ("| row | " + " | ".join(f"val loss, seed {s}" for s in seeds) + " | "
            + " | ".join(f"vs blocking, seed {s}" for s in seeds) + " | mean vs blocking | target | met "
            "| final train loss, seed {0} | loop s, seed {0} | counted MB/step/rank |".format(seeds[0]))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in keys:
        runs = [by.get((key, s)) for s in seeds]
        first = next(r for r in runs if r is not None)
        vals = [f"{r['val_loss']:.4f}" if r else "-" for r in runs]
        gaps = []
        for s, r in zip(seeds, runs):
            base = by.get(("blocking", s))
            gaps.append(None if r is None or base is None else r["val_loss"] / base["val_loss"] - 1.0)
        known = [g for g in gaps if g is not None]
        mean = sum(known) / len(known) if known else None
        target, met = "", ""
        if first["target"] is not None and mean is not None:
            target = f"<= +{first['target']:.0%}"
            met = "yes" if mean <= first["target"] else "**no**"
            if len(known) > 1 and (max(known) > first["target"]) != (min(known) > first["target"]):
                met += " (not on every seed)"
        lines.append(f"| {first['label']} | " + " | ".join(vals) + " | "
                     + " | ".join("-" if g is None else f"{g:+.2%}" for g in gaps) + " | "
                     + ("-" if mean is None else f"{mean:+.2%}")
                     + f" | {target} | {met} | {first['train_loss']:.4f} | {first['seconds']:.0f} "
                     f"| {first['comm_bytes_per_step'] / 1e6:.4f}{'*' if not first['comm_bytes_per_step'] else ''} |")
    return "\n".join(lines)


def _local_steps(steps: int, k: int, fragments: int, tau: int) -> str:
    """Inner steps since each fragment last took the global weights, after ``steps`` steps (Note
    [Streaming schedule]: fragment f >= 1 launched at t % k == f * k / F, fragment 0 at t % k == 0,
    applied tau steps later)."""
    s = k // fragments
    out = []
    for f in range(fragments):
        offset = f * s if f else k
        applied = [t + tau for t in range(offset, steps + 1, k) if t + tau <= steps]
        out.append(str(steps - (applied[-1] if applied else 0)))
    return out[0] if fragments == 1 else "(" + ", ".join(out) + ")"


def _streaming_verdicts(results: list[dict], table_rows: list[tuple] | None = None) -> str:
    by = {(r["key"], r["config"]["seed"]): r for r in results}
    blocking = sorted((s, r["val_loss"]) for (k, s), r in by.items() if k == "blocking")
    lines = []
    spread = 0.0
    if len(blocking) > 1:
        lo, hi = min(v for _, v in blocking), max(v for _, v in blocking)
        spread = hi / lo - 1.0
        lines.append("Noise reference: the blocking mode's validation loss over seeds "
                     + ", ".join(f"{s}: {v:.4f}" for s, v in blocking) + f" (spread {spread:.2%}).\n")
    for key, label, _, target in table_rows or STREAMING_ROWS:
        gaps = [by[(key, s)]["val_loss"] / by[("blocking", s)]["val_loss"] - 1.0 for s, _ in blocking if (key, s) in by]
        if target is None or not gaps:
            continue
        mean = sum(gaps) / len(gaps)
        verdict = "met" if mean <= target else "not met"
        same_sign = len(gaps) > 1 and (all(g > 0 for g in gaps) or all(g < 0 for g in gaps))
        paired = (f"; same sign on every seed ({', '.join(f'{g:+.2%}' for g in gaps)})" if same_sign
                  else f"; per seed {', '.join(f'{g:+.2%}' for g in gaps)}" if len(gaps) > 1 else "")
        name = next(r["label"] for r in results if r["key"] == key)
        lines.append(f"- {name}: {mean:+.2%} vs blocking (mean over {len(gaps)} seed(s)), target <= +{target:.0%}: "
                     f"**{verdict}**{paired}.")
    seeds = [s for s, _ in blocking] or sorted({s for _, s in by})
    for eager, naive in (("eager-int4", "naive-int4"),):
        pairs = [(by[(eager, s)]["val_loss"], by[(naive, s)]["val_loss"]) for s in seeds
                 if (eager, s) in by and (naive, s) in by]
        if pairs:
            wins = sum(e < n for e, n in pairs)
            lines.append(f"- eager vs naive delayed (int4, same delay): val loss {', '.join(f'{e:.4f} vs {n:.4f}' for e, n in pairs)}"
                         f" (seed by seed): eager lower on {wins} of {len(pairs)} seed(s).")
    return "\n".join(lines)


def main_streaming(args: argparse.Namespace) -> int:
    rate = None if args.rate.lower() == "none" else args.rate
    table_rows = SUITES[args.suite]
    known = {r[0] for r in table_rows}
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json.split(",")]
        results = [r for run in runs for r in run["results"] if r["key"] in known]
        rate = runs[0].get("rate", rate)
    else:
        if rate is not None:
            if (status := cluster_unavailable("convergence", " (use --rate none)")) is not None:
                return status
        wanted = args.rows.split(",") if args.rows else [r[0] for r in table_rows]
        bad = [k for k in wanted if k not in known]
        if bad:
            raise SystemExit(f"--rows: unknown row(s) {', '.join(bad)}; choose from {', '.join(sorted(known))}")
        rows = [r for r in table_rows if r[0] in wanted]
        seeds = [int(x) for x in args.seeds.split(",")]
        load_before = os.getloadavg()
        results = run_streaming(rows, steps=args.steps, batch=args.batch_size, fragments=args.num_fragments,
                                seeds=seeds, rate=rate, k=args.k)
        command = "python -m benchmarks.convergence " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
        runs = [{"results": results, "rate": rate, "load_before": load_before, "load_after": os.getloadavg(),
                 "command": command}]
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(runs[0], indent=1))
    png = IMG / ("convergence_streaming.png" if args.suite == "streaming" else "convergence_slow_links.png")
    groups: dict[int, list[dict]] = {}
    for r in results:
        groups.setdefault(r["config"]["steps"], []).append(r)
    plotted = next(iter(groups.values()))
    if args.write:
        plot_streaming([r for r in plotted if r["key"] in _PLOTTED_CURVES.get(args.suite, {r["key"]})], png, rate)
        if args.suite == "slow-links":
            plot_bits_vs_loss(plotted, IMG / "bits_vs_loss.png")
    sections = [f"#### {steps} steps\n\n{streaming_table(rs)}\n\n{_streaming_verdicts(rs, table_rows)}"
                for steps, rs in groups.items()]
    notes = []
    if len(runs) > 1:
        notes.append(f"The tables merge the `--json-out` files of the {len(runs)} invocations listed at the end.")
    if any(not r["comm_bytes_per_step"] for r in results):
        notes.append("\\* 0 counted: the trainer build that ran these rows counted collectives with a dispatcher "
                     "mode that does not see the int8/int4 collectives (they run on a worker thread); the bytes "
                     "those rows send are in the rows of the other step count.")
    blocking = {s: [r["val_loss"] for r in rs if r["key"] == "blocking"] for s, rs in groups.items()}
    if sum(1 for v in blocking.values() if v) > 1:
        notes.append("The evaluated step matters: the blocking mode's validation loss is "
                     + "; ".join(f"{', '.join(f'{v:.4f}' for v in vals)} at {s} steps" for s, vals in blocking.items()
                                 if vals)
                     + " (seeds in order): right after a sync every rank holds the averaged slow weights, "
                     "mid-period each its own local ones; streaming never has all fragments synced at once.")
    notes += [("The plot shows the " + (f"{rate} cluster" if rate else "local") + f" runs of {plotted[0]['config']['steps']} "
              "steps. The wall-clock axis spreads each run's loop time evenly over its steps; the machine's 2 cores "
              "were shared with other jobs (load averages below), so loop times and the right-hand plot are "
              "indicative only, while the losses do not depend on load or link (same batches, same sums: the "
              "blocking seed-1 row, run twice, gave the same validation loss to the last digit)."),
             "Local steps since each fragment last took the global weights, at the evaluated step (a fragment "
             "launched at that step is still in flight and is evaluated local): "
             + "; ".join(f"{steps} steps: blocking {_local_steps(steps, 16, 1, 0)}, streaming "
                         f"{_local_steps(steps, 16, rs[-1]['config']['num_fragments'], 1)}"
                         for steps, rs in groups.items()) + "."]
    first = results[0]
    m = first["config"]["model"]

    def load(t: tuple[float, ...]) -> str:
        return " / ".join(f"{x:.1f}" for x in t)

    c = first["config"]
    notes.append(f"{first['params']:,} parameters ({m['n_layer']} layers, d={m['d_model']}, ctx {m['seq_len']}), "
                 f"corpus `{c['corpus']}`, {c['batch_size']} sequences per step over 2 ranks (gloo, CPU); AdamW lr "
                 f"{c['lr']:g}, weight decay {c['weight_decay']:g}, clip {c['grad_clip']:g}; local-SGD rows: "
                 f"Lookahead k=16, alpha 0.5 (the outer step), streaming F="
                 f"{max(r['config']['num_fragments'] for r in results)}, tau=1, fragment_update_alpha 0; val loss "
                 f"on {c['eval_batches']} held-out batches (drawn with the seed), mean over the two ranks' final "
                 "weights.")
    for run in runs:
        link = (f"simulated cluster (`tools/netcluster.py`), 2 namespace nodes x 1 rank, {run['rate']} link each "
                "direction, each row under `torchrun` on every node" if run["rate"]
                else "2 ranks spawned on this machine, no simulated link")
        notes.append(f"`{run['command']}` ({link}); load average (1/5/15 min) before {load(run['load_before'])}, "
                     f"after {load(run['load_after'])}; its rows:\n\n"
                     + "\n".join(f"    {r['command']}" for r in run["results"] if r["key"] in known))
    bits_plot = ("![bits per parameter vs loss](img/bits_vs_loss.png)\n\n(validation loss against bits per "
                 "parameter per sync, from the same runs: blocking rows at F=1 and the eager rows)\n\n"
                 if args.suite == "slow-links" else "")
    body = (f"![streaming convergence](img/{png.name})\n\n" + bits_plot + "\n\n".join(sections) + "\n\n"
            + "\n\n".join(notes))
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        cmd = " ".join(["OMP_NUM_THREADS=1 python -m benchmarks.convergence",
                        *(sys.argv[1:] if args.argv is None else args.argv)])
        write_section(STREAMING_SECTION if args.suite == "streaming" else SLOW_LINKS_SECTION, cmd, body)
    return 0


STREAMING_SECTION = "Convergence of streaming local SGD (real trainer)"
SLOW_LINKS_SECTION = "Convergence of eager, 2-bit and sparse outer updates (real trainer)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="loss vs steps / wall-clock on two real tasks")
    p.add_argument("--corpora", default="pydoc,stdlib")
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16, help="global")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--json-out", default=None)
    p.add_argument("--write", action="store_true", help="PNGs to docs/img/ and a section in docs/benchmarks.md")
    p.add_argument("--suite", choices=("tasks", "streaming", "slow-links"), default="tasks",
                   help="tasks: the two-task comparison (default); streaming: streaming vs blocking local SGD "
                   "(on the trainer's corpus, pydoc); slow-links: eager, int2 and sparse rows vs blocking")
    p.add_argument("--rate", default="200mbit",
                   help="--suite streaming: link rate of the simulated cluster (root), or 'none' to spawn the "
                   "ranks here (default: 200mbit)")
    p.add_argument("--num-fragments", type=int, default=2, help="--suite streaming: F (a divisor of k; default: 2)")
    p.add_argument("--k", type=int, default=16, help="--suite streaming/slow-links: Lookahead's k (default: 16)")
    p.add_argument("--seeds", default="0", help="--suite streaming: comma-separated seeds, each row per seed "
                   "(default: 0)")
    p.add_argument("--from-json", default=None,
                   help="--suite streaming: only format (table, plot, doc) the --json-out files given, comma-separated")
    p.add_argument("--rows", default=None,
                   help="--suite streaming: comma-separated row keys (default: all: "
                   + ",".join(r[0] for r in STREAMING_ROWS) + ")")
    args = p.parse_args(argv)
    args.argv = argv
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    if args.suite in SUITES:
        return main_streaming(args)
    all_results = {c: run(c, args.steps, args.batch_size, args.nproc) for c in args.corpora.split(",")}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(all_results, indent=1))
    parts = []
    for corpus, results in all_results.items():
        png = IMG / f"convergence_{corpus}.png"
        if args.write:
            plot(corpus, results, png)
        first = results[0]
        m = first["config"]["model"]
        parts.append(f"### Task `{corpus}`\n\n![{corpus}](img/{png.name})\n\n{table(results)}\n\n"
                     f"{first['params']:,} parameters ({m['n_layer']} layers, d={m['d_model']}, ctx {m['seq_len']}), "
                     f"{args.steps} steps x {args.batch_size} sequences over {args.nproc} ranks (gloo, CPU), "
                     "AdamW lr 3e-3, weight decay 0.01, clip 1.0, seed 0; val loss on 8 held-out batches.")
    body = "\n\n".join(parts)
    print(body)
    if args.write:
        from benchmarks._docs import write_section

        write_section("Convergence on real data (real trainer)",
                      f"OMP_NUM_THREADS=1 python -m benchmarks.convergence --corpora {args.corpora} --steps "
                      f"{args.steps} --batch-size {args.batch_size} --nproc {args.nproc} --write", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
