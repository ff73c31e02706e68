"""Streaming local SGD vs blocking local SGD, DDP and the peers' local SGD, on the simulated cluster.

The throughput half of issue 9's benchmarks: the real trainer (``lookahead-dist train``) on 2
nodes of ``tools/netcluster.py`` (one rank each, gloo on CPU), k = 16 (``--k``), per link rate:

1. the **no-communication ceiling** (local SGD with k larger than the run), ``--reps`` times;
2. a **probe** of one fragment's all-reduce alone on the link (``benchmarks/workers/allreduce_probe.py``)
   for F = 1, 2, 4 and each wire format: the time per fragment, and how many inner steps of the
   ceiling run it spans; it chooses tau (below);
3. every row ``--reps`` times, the (row, repetition) jobs in one shuffled order (``--seed``);
4. the ceiling again, ``--reps`` times.

Rows: DDP (AdamW); blocking local SGD (fp32, bf16); streaming with F = 2 and 4 in fp32, bf16,
int8, int4; torch ``PostLocalSGDOptimizer``; accelerate ``LocalSGD``; torchft ``DiLoCo`` with the
same F and tau as the fp32 streaming rows (a lighthouse started in node 0 per run); optionally the
blocking fp32 row on the code of an earlier commit (``--base-commit``: same trainer flags, the
library from ``git archive``), to check that the blocking path did not change.

tau (``--fragment-sync-delay``) per (F, wire format): the smallest number of inner steps that covers
the probed transfer, ``ceil(t_fragment / t_step)`` (at least 1), plus ``--tau-margin``, capped at
``k / F - 1``; ``--tau F=2:7,F=4:3`` fixes it instead.

Each table cell is the median of the repetitions with [min-max]; 'of ceiling' divides by the median
of all ceiling runs (before and after) of that link. Run as root::

    python -m benchmarks.streaming --rates 1gbit,200mbit --write --plot
    python -m benchmarks.streaming --rates 200mbit --reps 1 --steps 32 --rows block-fp32,s2-int8   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import (
    ROOT,
    cluster_unavailable,
    equalise_allocator,
    error_line,
    median_range,
    shuffled,
    trainer_exe,
)

K = 16
DTYPES = ("fp32", "bf16", "int8", "int4")
FRAGMENTS = (2, 4)
DEFAULT_MODEL = "--layers 6 --d-model 256 --heads 8 --seq-len 64"


@dataclass(frozen=True)
class Spec:
    key: str
    label: str
    args: tuple[str, ...]
    fragments: int = 1
    wire: str = "fp32"
    tau: int = 0
    base: bool = False  # run on the library of --base-commit
    torchft: bool = False
    group: str = ""  # plot group


def rows(taus: dict[tuple[int, str], int]) -> list[Spec]:
    ls = ("--mode", "local-sgd", "--k", str(K))
    out = [
        Spec("ddp", "DDP (AdamW)", ("--mode", "ddp", "--no-lookahead"), group="DDP"),
        Spec("block-fp32", "blocking local SGD, fp32", ls, group="blocking"),
        Spec("block-bf16", "blocking local SGD, bf16", (*ls, "--comm-dtype", "bf16"), wire="bf16", group="blocking"),
    ]
    for f in FRAGMENTS:
        for dt in DTYPES:
            tau = taus[(f, dt)]
            extra = () if dt == "fp32" else ("--comm-dtype", dt)
            out.append(Spec(f"s{f}-{dt}", f"streaming F={f} tau={tau}, {dt}",
                            (*ls, "--num-fragments", str(f), "--fragment-sync-delay", str(tau), *extra),
                            fragments=f, wire=dt, tau=tau, group="streaming"))
            if dt.startswith("int"):  # LocalSGDOptions(fused_kernels=True): the same numbers, compiled kernels
                out.append(Spec(f"s{f}-{dt}-fused", f"streaming F={f} tau={tau}, {dt}, fused kernels",
                                (*ls, "--num-fragments", str(f), "--fragment-sync-delay", str(tau), *extra,
                                 "--fused-kernels"), fragments=f, wire=dt, tau=tau, group="streaming"))
    out += [
        Spec("torch-plsgd", "torch PostLocalSGDOptimizer", ("--mode", "post-local-sgd", "--k", str(K)), group="peers"),
        Spec("accel-lsgd", "accelerate LocalSGD", ("--mode", "accelerate-local-sgd", "--k", str(K)), group="peers"),
    ]
    for f in FRAGMENTS:
        tau = taus[(f, "fp32")]
        out.append(Spec(f"ft-f{f}", f"torchft DiLoCo F={f} tau={tau}, fp32",
                        ("--mode", "torchft-diloco", "--k", str(K), "--num-fragments", str(f),
                         "--fragment-sync-delay", str(tau)), fragments=f, tau=tau, torchft=True, group="peers"))
    out.append(Spec("block-fp32-base", "blocking local SGD, fp32, base commit", ls, base=True, group="blocking"))
    # Issue 16, for 10-100 Mbit/s links: each sync's collective lands at the next sync (a whole
    # inner phase of overlap; tau = 0 by construction), dense or top-2% sparse at 2 bits.
    eager = (*ls, "--num-fragments", str(EAGER_F), "--eager-update")
    for dt in ("fp32", "int8", "int4", "int2"):
        out.append(Spec(f"eager-{dt}", f"eager F={EAGER_F}, {dt}", (*eager, *(() if dt == "fp32" else ("--comm-dtype", dt))),
                        fragments=EAGER_F, wire=dt, group="eager"))
    out.append(Spec("eager-sparse2", f"eager F={EAGER_F}, top-2% at int2", (*eager, "--comm-dtype", "int2",
                                                                           "--topk-fraction", "0.02"),
                    fragments=EAGER_F, wire="int2 top-2%", group="eager"))
    out.append(Spec("eager-sparse3", f"eager F={EAGER_F}, top-3% at int2", (*eager, "--comm-dtype", "int2",
                                                                           "--topk-fraction", "0.03"),
                    fragments=EAGER_F, wire="int2 top-3%", group="eager"))
    # Sharded slow weights (each rank 1/N): the eager rule reduce-scatters progress, quantised or
    # not, and all-gathers the new slow chunks in fp32.
    for dt in ("fp32", "int8", "int2"):
        out.append(Spec(f"eager-sharded-{dt}", f"eager F={EAGER_F}, sharded, {dt} scatter + fp32 gather",
                        (*eager, "--local-sgd-sharded", *(() if dt == "fp32" else ("--comm-dtype", dt))),
                        fragments=EAGER_F, wire=dt, group="eager"))
    out.append(Spec("eager-sharded-sparse2", f"eager F={EAGER_F}, sharded, top-2% int2 scatter + fp32 gather",
                    (*eager, "--local-sgd-sharded", "--comm-dtype", "int2", "--topk-fraction", "0.02"),
                    fragments=EAGER_F, wire="int2 top-2%", group="eager"))
    out.append(Spec("sparse2", "blocking, top-2% at int2", (*ls, "--comm-dtype", "int2", "--topk-fraction", "0.02"),
                    wire="int2 top-2%", group="blocking"))
    # Issue 16's control rows: each streaming row's bytes on the same schedule, as a bare async
    # all-reduce beside a Lookahead that never syncs (`--mode traffic-only`): the link and gloo's
    # threads without the sync's own CPU work. A streaming row's gap to its control is that work.
    for f in FRAGMENTS:
        for dt in DTYPES:
            tau = taus[(f, dt)]
            extra = () if dt == "fp32" else ("--comm-dtype", dt)
            out.append(Spec(f"t{f}-{dt}", f"traffic only as streaming F={f} tau={tau}, {dt}",
                            ("--mode", "traffic-only", "--k", str(K), "--num-fragments", str(f),
                             "--fragment-sync-delay", str(tau), *extra), fragments=f, wire=dt, tau=tau, group="control"))
    out.append(Spec("t-sparse2", "traffic only as blocking top-2% int2",
                    ("--mode", "traffic-only", "--k", str(K), "--comm-dtype", "int2", "--topk-fraction", "0.02"),
                    wire="int2 top-2%", group="control"))
    # the eager top-2% row's bytes on its fragment schedule (waited for tau = 3 steps later; the
    # eager rule waits k steps, so this control is no easier on the link)
    out.append(Spec("t-eager-sparse2", f"traffic only as eager F={EAGER_F}, top-2% at int2",
                    ("--mode", "traffic-only", "--k", str(K), "--num-fragments", str(EAGER_F),
                     "--fragment-sync-delay", str(K // EAGER_F - 1), "--comm-dtype", "int2", "--topk-fraction", "0.02"),
                    fragments=EAGER_F, tau=K // EAGER_F - 1, wire="int2 top-2%", group="control"))
    return out


EAGER_F = 4
CEILING = Spec("ceiling", "no-communication ceiling", ("--mode", "local-sgd", "--k", "1000000"), group="ceiling")


def _lighthousetrainer_exe() -> str:
    exe = Path(sys.executable).parent / "torchft_lighthouse"
    return str(exe) if exe.exists() else (shutil.which("torchft_lighthouse") or "torchft_lighthouse")


def base_tree(commit: str) -> Path:
    """The ``src/`` of ``commit`` unpacked into a temporary directory (``git archive``; the checkout
    is not touched)."""
    out = Path(tempfile.mkdtemp(prefix="lkd-base-"))
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=data, check=True)
    return out / "src"


@dataclass
class Job:
    cluster: object
    out_dir: Path
    model: list[str]
    per_rank_batch: int
    steps: int
    timeout: float
    echo: bool
    base_src: Path | None
    ft_tick_ms: int
    port: int = 29800
    log: list[str] = field(default_factory=list)

    def run(self, s: Spec, rep: int) -> dict:
        from tools.netcluster import torchrun_argv

        c = self.cluster
        c.master_port = self.port
        self.port += 1
        path = self.out_dir / f"{s.key}-{rep}-{self.port}.json"
        cmd = [trainer_exe(), "train", *s.args, *self.model, "--steps", str(self.steps), "--batch-size",
               str(self.per_rank_batch * 2), "--eval-batches", "1", "--device", "cpu", "--no-progress",
               "--json", str(path)]
        rec = {"key": s.key, "row": s.label, "rep": rep, "steps": self.steps, "fragments": s.fragments,
               "wire": s.wire, "tau": s.tau, "command": " ".join(["lookahead-dist", *cmd[1:-2]]),
               "start": time.strftime("%H:%M:%S"), "load1": os.getloadavg()[0]}
        env = dict(os.environ)
        lighthouse = None
        if s.base:
            env["PYTHONPATH"] = str(self.base_src) + os.pathsep + env.get("PYTHONPATH", "")
        if s.torchft:
            lh_port = self.port + 5000
            lighthouse = subprocess.Popen(
                ["ip", "netns", "exec", c.node_ns(0), _lighthousetrainer_exe(), "--min_replicas", "2",
                 "--quorum_tick_ms", str(self.ft_tick_ms), "--join_timeout_ms", "10000", "--bind", f"[::]:{lh_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            env["TORCHFT_LIGHTHOUSE"] = f"http://{c.addr(0)}:{lh_port}"
            env.setdefault("RUST_LOG", "warn")
        t0 = time.perf_counter()
        try:
            res = c.run(torchrun_argv(cmd), timeout=self.timeout, echo=self.echo, env=env)
            if path.exists():
                run = json.loads(path.read_text())["runs"][0]
                if run.get("skipped"):
                    rec["error"] = run.get("reason", "skipped")
                else:
                    rec.update({k: run[k] for k in ("samples_per_s", "seconds", "comm_bytes_per_step",
                                                    "wire_tx_bytes_per_step", "train_loss", "val_loss", "params",
                                                    "comm_bytes_by_op")})
                    rec["wait_ms_per_step"] = run.get("wait_ms_per_step")  # None: not measured (e.g. DDP)
            else:
                bad = next((r for r in res if r.returncode != 0), res[0])
                rec["error"] = f"node {bad.node_rank} exit {bad.returncode}: {error_line(bad.output())[:300]}"
        except TimeoutError as e:
            rec["error"] = f"timeout: {e}"
        finally:
            if lighthouse is not None:
                os.killpg(lighthouse.pid, 15)
                lighthouse.wait(timeout=10)
        rec["job_seconds"] = time.perf_counter() - t0
        msg = rec.get("error") or f"{rec['samples_per_s']:.2f} samples/s ({rec['seconds']:.1f} s loop)"
        print(f"[{time.strftime('%H:%M:%S')} {s.key} rep {rep}] {msg} ({rec['job_seconds']:.0f} s job)",
              file=sys.stderr, flush=True)
        return rec

    def probe(self, numel: int, reps: int) -> dict:
        from tools.netcluster import torchrun_argv

        c = self.cluster
        c.master_port = self.port
        self.port += 1
        out = self.out_dir / f"probe-{self.port}.json"
        cmd = [str(ROOT / "benchmarks" / "workers" / "allreduce_probe.py"), "--numel", str(numel), "--fragments", "1,2,4",
               "--dtypes", ",".join(DTYPES), "--reps", str(reps), "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        c.run(torchrun_argv(cmd), timeout=self.timeout, echo=self.echo, env=env)
        return json.loads(out.read_text())


def choose_taus(probe: dict, t_step: float, margin: int, fixed: dict[int, int]) -> dict[tuple[int, str], int]:
    taus = {}
    for f in FRAGMENTS:
        for dt in DTYPES:
            if f in fixed:
                taus[(f, dt)] = fixed[f]
                continue
            t = statistics.median(probe["times"][f"F={f} {dt}"])
            taus[(f, dt)] = min(K // f - 1, max(1, math.ceil(t / t_step)) + margin)
    return taus


def run_link(rate: str, args: argparse.Namespace, base_src: Path | None) -> dict:
    from tools.netcluster import Cluster

    model = args.model.split()
    out_dir = Path(tempfile.mkdtemp(prefix="lkd-streaming-"))
    link = {"rate": rate, "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with Cluster(2, rate, master_port=29800) as c:
        job = Job(c, out_dir, model, args.per_rank_batch, args.steps, args.timeout, args.echo, base_src,
                  args.ft_quorum_tick_ms)
        link["ceiling_before"] = [job.run(CEILING, r) for r in range(args.ceiling_reps)]
        ok = [r for r in link["ceiling_before"] if "error" not in r]
        if not ok:
            raise RuntimeError(f"{rate}: the ceiling runs failed: {link['ceiling_before'][0].get('error')}")
        t_step = statistics.median(r["seconds"] for r in ok) / args.steps
        numel = ok[0]["params"]
        link["probe"] = job.probe(numel, args.probe_reps)
        link["t_step"] = t_step
        taus = choose_taus(link["probe"], t_step, args.tau_margin, args.tau)
        link["taus"] = {f"F={f} {dt}": t for (f, dt), t in taus.items()}
        specs = [s for s in rows(taus) if s.key in args.rows and (not s.base or rate in args.base_rates)]
        by_key = {s.key: s for s in specs}
        jobs = [(by_key[key], r) for key, r in shuffled(by_key, args.reps, args.seed)]
        link["order"] = [f"{s.key}#{r}" for s, r in jobs]
        link["results"] = []
        for s, r in jobs:
            paired = job.run(CEILING, r) if args.paired else None  # the same minute's ceiling
            rec = job.run(s, r)
            if paired is not None and "error" not in paired:
                rec["paired_ceiling_sps"] = paired["samples_per_s"]
                link.setdefault("ceiling_paired", []).append(paired)
            link["results"].append(rec)
        link["ceiling_after"] = [job.run(CEILING, r) for r in range(args.ceiling_reps)]
    link["load_after"] = os.getloadavg()
    link["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return link


# -- reporting --------------------------------------------------------------------------------------
def _ceiling(link: dict) -> float:
    runs = [r["samples_per_s"] for r in link["ceiling_before"] + link["ceiling_after"] if "error" not in r]
    return statistics.median(runs)


def _best_ceiling(link: dict) -> float:
    """The fastest ceiling run of the link (before, after, paired): the least disturbed by other load."""
    runs = link["ceiling_before"] + link["ceiling_after"] + link.get("ceiling_paired", [])
    return max(r["samples_per_s"] for r in runs if "error" not in r)


FUSED = [f"s{f}-{dt}-fused" for f in FRAGMENTS for dt in DTYPES if dt.startswith("int")]
ORDER = ["ddp", "block-fp32", "block-fp32-base", "block-bf16", "sparse2", *[f"s{f}-{dt}" for f in FRAGMENTS for dt in DTYPES],
         *FUSED,
         "eager-fp32", "eager-int8", "eager-int4", "eager-int2", "eager-sparse2", "eager-sparse3",
         "eager-sharded-fp32", "eager-sharded-int8", "eager-sharded-int2", "eager-sharded-sparse2",
         "torch-plsgd", "accel-lsgd", *[f"ft-f{f}" for f in FRAGMENTS],
         *[f"t{f}-{dt}" for f in FRAGMENTS for dt in DTYPES], "t-sparse2", "t-eager-sparse2"]


def control_gaps(link: dict) -> list[str]:
    """Each row beside its traffic-only control (issue 16: within 3 points): the medians' difference
    in points of the ceiling."""
    fr = fractions(link)
    out = []
    pairs = [(f"s{f}-{dt}", f"t{f}-{dt}") for f in FRAGMENTS for dt in DTYPES] + [("sparse2", "t-sparse2"),
                                                                                   ("eager-sparse2", "t-eager-sparse2")]
    pairs += [(key, key.removesuffix("-fused").replace("s", "t", 1)) for key in FUSED]
    for key, ctrl in pairs:
        if fr.get(key) and fr.get(ctrl):
            gap = 100 * (statistics.median(fr[key]) - statistics.median(fr[ctrl]))
            out.append(f"- {key} {statistics.median(fr[key]):.2f} vs its control {ctrl} "
                       f"{statistics.median(fr[ctrl]):.2f}: {gap:+.0f} points ({'within' if gap >= -3 else '**not within**'} 3)")
    return out


def _by_row(link: dict) -> dict[str, list[dict]]:
    """Runs per row key, rows in table order (not the shuffled run order)."""
    out: dict[str, list[dict]] = {}
    for r in sorted(link["results"], key=lambda r: (ORDER.index(r["key"]), r["rep"])):
        out.setdefault(r["key"], []).append(r)
    return out


def _plot_label(key: str, links: list[dict]) -> str:
    r = next(r for l in links for r in l["results"] if r["key"] == key)
    label = r["row"].split(" tau=")[0] + ("," + r["row"].split(",", 1)[1] if " tau=" in r["row"] else "")
    if r["tau"]:
        taus = " / ".join(str(next((x["tau"] for x in l["results"] if x["key"] == key), "-")) for l in links)
        label += f" (tau {taus})"
    return label


def fractions(link: dict) -> dict[str, list[float]]:
    c = _ceiling(link)
    return {k: [r["samples_per_s"] / c for r in rs if "error" not in r] for k, rs in _by_row(link).items()}


def _rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, m in units.items():
        if rate.lower().endswith(u):
            return float(rate[: -len(u)]) * m
    raise ValueError(f"link rate {rate!r}: expected e.g. 200mbit or 1gbit")


#: The rows of the utilisation-vs-bandwidth plot: per family, the best of its keys on each link.
BANDWIDTH_FAMILIES = {
    "DDP": ("ddp",),
    "blocking fp32": ("block-fp32",),
    "streaming (best F, wire)": tuple(f"s{f}-{dt}" for f in FRAGMENTS for dt in DTYPES),
    "eager (best wire)": ("eager-fp32", "eager-int8", "eager-int4", "eager-int2", "eager-sparse2", "eager-sparse3"),
    "top-2% int2, blocking": ("sparse2",),
    "torch PostLocalSGD": ("torch-plsgd",),
    "accelerate LocalSGD": ("accel-lsgd",),
    "torchft DiLoCo (best F)": tuple(f"ft-f{f}" for f in FRAGMENTS),
}


def plot_bandwidth(links: list[dict], path: Path) -> None:
    """Fraction of the ceiling against the link rate: per family of rows, its best median on each
    link rate over the runs given (bars: that row's min-max). Links run with other models are
    marked in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6))
    for fam, keys in BANDWIDTH_FAMILIES.items():
        by_rate: dict[float, tuple[float, float, float, float]] = {}
        for l in links:
            fr = fractions(l)
            best = max((k for k in keys if fr.get(k)), key=lambda k: statistics.median(fr[k]), default=None)
            if best is not None:
                v = fr[best]
                pt = (_rate_bits(l["rate"]), statistics.median(v), min(v), max(v))
                if pt[0] not in by_rate or pt[1] > by_rate[pt[0]][1]:  # a rate run twice: the better run
                    by_rate[pt[0]] = pt
        if not by_rate:
            continue
        pts = sorted(by_rate.values())
        xs, ys = [p[0] / 1e6 for p in pts], [p[1] for p in pts]
        ax.errorbar(xs, ys, yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], marker="o", capsize=3,
                    label=fam, alpha=0.85)
    for x in (0.9, 0.95):
        ax.axhline(x, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("link rate (Mbit/s), 2 nodes x 1 rank")
    ax.set_ylabel("fraction of the no-communication ceiling")
    ax.set_ylim(0, 1.15)
    ax.set_title("utilisation vs bandwidth (median of 3 runs; bars: min-max)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(link: dict) -> str:
    c = _ceiling(link)
    paired = any("paired_ceiling_sps" in r for r in link["results"])
    best_c = _best_ceiling(link)
    lines = ["| row | F | tau | wire | samples/s | of ceiling | best / best ceiling "
             + ("| of paired ceiling " if paired else "")
             + "| counted MB/step/rank | wire MB/step (node 0) | waited ms/step | final train loss |",
             "|---|---|---|---|---|---|---|" + ("---|" if paired else "") + "---|---|---|---|"]
    for name, runs in (("no-communication ceiling, before", link["ceiling_before"]),
                       ("no-communication ceiling, after", link["ceiling_after"])):
        sps = [r["samples_per_s"] for r in runs if "error" not in r]
        lines.append(f"| {name} | - | - | - | {median_range(sps, '.2f')} | {median_range([s / c for s in sps], '.3f')} | "
                     f"{max(sps) / best_c:.3f} | " + ("- | " if paired else "") + "0.00 | "
                     f"{median_range([r['wire_tx_bytes_per_step'] / 1e6 for r in runs if 'error' not in r], '.3f')} | - | "
                     f"{median_range([r['train_loss'] for r in runs if 'error' not in r], '.3f')} |")
    for key, runs in _by_row(link).items():
        good = [r for r in runs if "error" not in r]
        r0 = runs[0]
        if not good:
            lines.append(f"| {r0['row']} | {r0['fragments']} | {r0['tau']} | {r0['wire']} | failed: "
                         f"{r0['error'][:200]} | | | | |" + (" |" if paired else "") + " |")
            continue
        sps = [r["samples_per_s"] for r in good]
        wire = [r["wire_tx_bytes_per_step"] / 1e6 for r in good if r.get("wire_tx_bytes_per_step") is not None]
        fail = f" ({len(runs) - len(good)} of {len(runs)} failed)" if len(good) < len(runs) else ""
        pc = [r["samples_per_s"] / r["paired_ceiling_sps"] for r in good if "paired_ceiling_sps" in r]
        waits = [r["wait_ms_per_step"] for r in good if r.get("wait_ms_per_step") is not None]
        lines.append(f"| {r0['row']}{fail} | {r0['fragments']} | {r0['tau']} | {r0['wire']} | {median_range(sps, '.2f')} "
                     f"| {median_range([s / c for s in sps], '.3f')} | {max(sps) / best_c:.3f} | "
                     + (f"{median_range(pc, '.3f')} | " if paired else "")
                     + f"{statistics.median(r['comm_bytes_per_step'] for r in good) / 1e6:.3f} "
                     f"| {median_range(wire, '.3f')} | {median_range(waits, '.1f') if waits else '-'} "
                     f"| {median_range([r['train_loss'] for r in good], '.3f')} |")
    return "\n".join(lines)


def probe_table(link: dict) -> str:
    t_step = link["t_step"]
    lines = ["| F | wire | all-reduce per fragment (s) | inner steps it spans | tau chosen |", "|---|---|---|---|---|"]
    for name, ts in link["probe"]["times"].items():
        f, dt = name[2:].split()
        tau = link["taus"].get(name, "-")
        lines.append(f"| {f} | {dt} | {median_range(ts, '.3f')} | {statistics.median(ts) / t_step:.2f} | {tau} |")
    return "\n".join(lines)


def targets(links: list[dict]) -> list[str]:
    """The issue's targets per link: the best F's median 'of ceiling', with the load-robust estimates."""
    out = []
    by_rate = {l["rate"]: l for l in links}
    for rate, dt, goal in (("200mbit", "int8", 0.95), ("200mbit", "fp32", 0.90), ("1gbit", "fp32", 0.95)):
        l = by_rate.get(rate)
        fr = fractions(l) if l else {}
        cand = [(f, statistics.median(fr[f"s{f}-{dt}"])) for f in FRAGMENTS if fr.get(f"s{f}-{dt}")]
        if not cand:
            out.append(f"- streaming {dt} at {rate}: not measured")
            continue
        f, med = max(cand, key=lambda x: x[1])
        runs = [r for r in l["results"] if r["key"] == f"s{f}-{dt}" and "error" not in r]
        best = max(r["samples_per_s"] for r in runs) / _best_ceiling(l)
        pc = [r["samples_per_s"] / r["paired_ceiling_sps"] for r in runs if "paired_ceiling_sps" in r]
        extra = f", of the paired ceiling {statistics.median(pc):.1%}" if pc else ""
        mark = "met" if med >= goal else "NOT met"
        out.append(f"- streaming {dt} at {rate} (target >= {goal:.0%}): F={f} median {med:.1%} of the ceiling: "
                   f"**{mark}** (best run / best ceiling {best:.1%}{extra})")
    for rate, goal in (("50mbit", 0.95), ("10mbit", 0.90)):  # issue 16
        l = by_rate.get(rate)
        if l is None:
            continue
        fr = fractions(l)
        for key in ("s4-int4", "eager-fp32", "eager-int8", "eager-int4", "eager-int2", "eager-sparse2", "eager-sparse3",
                    "sparse2"):
            if fr.get(key):
                med = statistics.median(fr[key])
                out.append(f"- {key} at {rate} (target >= {goal:.0%} with a loss within 2% of blocking fp32): "
                           f"median {med:.1%} of the ceiling: **{'met' if med >= goal else 'NOT met'}** on throughput")
    for rate, l in by_rate.items():
        fr = fractions(l)
        if fr.get("block-fp32") and fr.get("block-fp32-base"):
            a, b = statistics.median(fr["block-fp32"]), statistics.median(fr["block-fp32-base"])
            out.append(f"- {rate}: blocking fp32 {a:.1%} of the ceiling vs {b:.1%} on the base commit "
                       f"(ratio {a / b:.3f})")
    return out


def plot(links: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ORDER if any(k in _by_row(l) for l in links)]
    labels = {k: _plot_label(k, links) for k in keys}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(keys) + 1.5))
    h = 0.8 / len(links)
    for i, l in enumerate(links):
        fr = fractions(l)
        ys = [j + i * h for j in range(len(keys))]
        med = [statistics.median(fr[k]) if fr.get(k) else 0 for k in keys]
        lo = [m - min(fr[k]) if fr.get(k) else 0 for m, k in zip(med, keys)]
        hi = [max(fr[k]) - m if fr.get(k) else 0 for m, k in zip(med, keys)]
        ax.barh(ys, med, height=h, xerr=[lo, hi], label=f"{l['rate']} (ceiling {_ceiling(l):.2f} samples/s)",
                capsize=2)
    ax.set_yticks([j + h * (len(links) - 1) / 2 for j in range(len(keys))], [labels[k] for k in keys], fontsize=8)
    ax.invert_yaxis()
    for x in (0.9, 0.95):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("samples/s as a fraction of the no-communication ceiling (median and min-max of the runs)")
    ax.set_xlim(0, max(1.1, max(max(v) for l in links for v in fractions(l).values() if v) + 0.05))
    ax.legend(loc="best", fontsize=8)
    ax.set_title("2 nodes x 1 rank, k=16, real trainer on the simulated cluster")
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)


def report(links: list[dict], args: argparse.Namespace) -> str:
    parts = []
    for l in links:
        lb, la = l["load_before"], l["load_after"]
        parts.append(f"### {l['rate']} links\n\nRun {l['started']} to {l['finished']}; load average (1/5/15 min) "
                     f"before {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}, after {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}. "
                     f"Ceiling step time {l['t_step'] * 1000:.0f} ms.\n\n" + table(l) +
                     "\n\nAll-reduce of one fragment alone on the link (probe, "
                     f"{len(next(iter(l['probe']['times'].values())))} runs, median [min-max]), in inner steps of the "
                     "ceiling run:\n\n" + probe_table(l)
                     + ("\n\nAgainst the traffic-only controls (the same bytes, none of the sync's CPU work):\n\n"
                        + "\n".join(gaps) if (gaps := control_gaps(l)) else ""))
    return "\n\n".join(parts) + "\n\nTargets of the issue:\n\n" + "\n".join(targets(links))


def main(argv: list[str] | None = None) -> int:
    global K
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1gbit,200mbit")
    p.add_argument("--rows", default=None, help="comma-separated row keys (default: all)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--k", type=int, default=K, help=f"Lookahead's k of every row (default {K})")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--per-rank-batch", type=int, default=2)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model flags of lookahead-dist train")
    p.add_argument("--tau-margin", type=int, default=1, help="steps added to the smallest hiding tau")
    p.add_argument("--tau", default=None, help="fix tau per F, e.g. 'F=2:7,F=4:3' (no probe-based choice)")
    p.add_argument("--ceiling-reps", type=int, default=2, help="ceiling runs before and again after the rows")
    p.add_argument("--paired", action="store_true",
                   help="also run the ceiling right before every row run ('of paired ceiling': robust to load drift)")
    p.add_argument("--probe-reps", type=int, default=3)
    p.add_argument("--ft-quorum-tick-ms", type=int, default=20, help="torchft lighthouse quorum tick")
    p.add_argument("--base-commit", default=None, help="commit whose library runs the block-fp32-base row")
    p.add_argument("--base-rates", default="200mbit", help="links on which the block-fp32-base row runs")
    p.add_argument("--seed", type=int, default=0, help="shuffle order")
    p.add_argument("--timeout", type=float, default=600.0, help="per job, seconds")
    p.add_argument("--json-out", default=None)
    p.add_argument("--from-json", default=None, help="only format results saved with --json-out")
    p.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    p.add_argument("--plot", action="store_true", help="write docs/img/streaming_throughput.png")
    p.add_argument("--plot-bandwidth", default=None, metavar="JSON,JSON",
                   help="only draw docs/img/utilisation_vs_bandwidth.png from these --json-out files (all their links)")
    p.add_argument("--echo", action="store_true")
    p.add_argument("--section", default="Streaming local SGD throughput on the simulated cluster (real trainer)",
                   help="title of the docs/benchmarks.md section --write replaces")
    args = p.parse_args(argv)
    K = args.k  # read by rows() and the tau choice
    sys.path.insert(0, str(ROOT))
    all_keys = [s.key for s in rows({(f, dt): 1 for f in FRAGMENTS for dt in DTYPES})]
    args.rows = args.rows.split(",") if args.rows else [k for k in all_keys if k != "block-fp32-base" or args.base_commit]
    unknown = set(args.rows) - set(all_keys)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; rows: {', '.join(all_keys)}")
    if "block-fp32-base" in args.rows and not args.base_commit:
        p.error("row block-fp32-base needs --base-commit")
    args.base_rates = args.base_rates.split(",")
    args.tau = {int(a.split(":")[0][2:]): int(a.split(":")[1]) for a in args.tau.split(",")} if args.tau else {}

    if args.plot_bandwidth:
        links = [l for f in args.plot_bandwidth.split(",") for l in json.loads(Path(f).read_text())]
        plot_bandwidth(links, ROOT / "docs" / "img" / "utilisation_vs_bandwidth.png")
        return 0
    if args.from_json:
        links = json.loads(Path(args.from_json).read_text())
    else:
        if (status := cluster_unavailable("streaming")) is not None:
            return status
        equalise_allocator()  # every row under one malloc setting (benchmarks/_common.py)
        base_src = base_tree(args.base_commit) if args.base_commit else None
        links = []
        for rate in args.rates.split(","):
            links.append(run_link(rate, args, base_src))
            if args.json_out:  # after each link: a crash later keeps what was measured
                Path(args.json_out).write_text(json.dumps(links, indent=1))
    body = report(links, args)
    print(body)
    if args.plot:
        plot(links, ROOT / "docs" / "img" / "streaming_throughput.png")
    if args.write:
        from benchmarks._docs import write_section

        first = next(r for l in links for r in l["results"] if "error" not in r)
        note = (f"\n\nModel: byte-level transformer LM of `lookahead-dist` ({first['params'] / 1e6:.2f}M parameters, "
                f"`{args.model}`), {args.per_rank_batch} sequences per rank per step, {args.steps} steps per run, "
                "AdamW lr 3e-3 inside Lookahead(alpha=0.5) for the local-SGD rows, plain AdamW for DDP and the peers "
                f"(torchft DiLoCo: outer SGD lr=0.5, momentum 0 = the same slow step). k = {K}. 2 nodes x 1 rank, "
                f"gloo on CPU, tbf-shaped links without added latency. Each row: {args.reps} runs in shuffled order; "
                f"median [min-max]; 'of ceiling' = samples/s / median of the {2 * args.ceiling_reps} ceiling runs "
                "of that link (half before, half after the rows). "
                "tau: smallest number of ceiling steps covering the probed fragment all-reduce, + "
                f"{args.tau_margin}, capped at k/F - 1. torchft lighthouse per run, quorum tick "
                f"{args.ft_quorum_tick_ms} ms. Per-row command: `lookahead-dist train <row flags> {args.model} "
                f"--steps {args.steps} --batch-size {2 * args.per_rank_batch}` under torchrun on each node "
                "(`benchmarks/streaming.py`; every command is in the JSON output).")
        if args.plot:
            note += "\n\n![streaming throughput](img/streaming_throughput.png)"
        rows_arg = f" --rows {','.join(args.rows)}" if args.rows != all_keys else ""
        section_arg = f" --section '{args.section}'" if args.section != p.get_default("section") else ""
        write_section(args.section,
                      f"python -m benchmarks.streaming --rates {args.rates}{rows_arg} --model '{args.model}'"
                      f" --steps {args.steps} --reps {args.reps}{section_arg}"
                      + (f" --base-commit {args.base_commit}" if args.base_commit else "") + " --write --plot",
                      body + note)
    return 0 if all("error" not in r for l in links for r in l["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
