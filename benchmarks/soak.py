"""Sustained faults: kill -9 a random torchft replica group every P seconds for D seconds, measure what it costs.

A torchft lighthouse and ``--replicas`` replica groups, each one ``launch/ft_train.py`` process
(gloo, the small regression MLP, ``Lookahead(AdamW)`` with ``LocalSGDOptions(manager=...)``). First a
fault-free run of ``--duration`` seconds, then, for each ``--period`` P, a run of the same length in
which one replica group chosen at random (seeded; among the groups that are up, i.e. have
committed since their last start) is killed with SIGKILL every P seconds and started again at once;
torchft's Manager heals it from a live peer at its first sync. After D seconds the kills stop, the
script waits until every group is up, and writes a stop step (the highest committed step + 2) so
that every group ends after the same final sync; each saves its model.

Reported per run, from the groups' event logs (``ft_train.py --log``):

- goodput: samples committed in [start, start + D] per second (a committed sync adds k x the
  group's rows for every participant that did the window's work; a healing group's window counts
  0), and its ratio to the fault-free run's;
- per failure: inner steps lost (the killed group's steps since its last sync, estimated from its
  step rate; k for every window a survivor dropped before the next kill; k for the healing
  group's own first window, spent on stale weights), time to heal (kill -> the restarted group's
  first committed sync) and its parts (spawn -> ready: interpreter, imports, Manager; ready ->
  first sync: k inner steps; that sync's quorum wait and heal);
- committed steps lost (the highest step any group ever committed minus the lowest final step);
- final loss on a held-out batch of 4096 rows, against the fault-free run's;
- whether every replica ends with identical weights (checksum and bit-for-bit comparison).

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.soak --duration 300 --period 60 20 --json docs/results/soak.json --write

``--period 0`` alone runs the fault-free run only. ``--write`` replaces the generated part of the
"Sustained faults" section of docs/reliability.md; ``--report FILE... [--write]`` rebuilds the tables
from saved ``--json`` files without running anything (the section was written that way from two).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT

FT_TRAIN = ROOT / "launch" / "ft_train.py"
RELIABILITY = ROOT / "docs" / "reliability.md"
SECTION = "Sustained faults"
BEGIN, END = "<!-- soak:begin (python -m benchmarks.soak --write) -->", "<!-- soak:end -->"
EVAL_ROWS = 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of training per run (D)")
    p.add_argument("--period", type=float, nargs="+", default=[60.0],
                   help="seconds between kills (P); one faulty run per value, after one fault-free run; "
                   "0 alone: the fault-free run only")
    p.add_argument("--replicas", type=int, default=3, help="replica groups (one process each)")
    p.add_argument("--seed", type=int, default=0, help="model, data and the choice of the group to kill")
    p.add_argument("--k", type=int, default=16, help="inner steps per sync")
    p.add_argument("--step-sleep", type=float, default=0.05, help="pretend compute per inner step, seconds")
    p.add_argument("--rows", type=int, default=16, help="rows per inner step per replica group")
    p.add_argument("--heartbeat-ms", type=int, default=5000,
                   help="lighthouse heartbeat timeout: how long a dead group holds up a quorum")
    p.add_argument("--join-timeout-ms", type=int, default=10000, help="lighthouse join timeout")
    p.add_argument("--timeout", type=float, default=10.0, help="ft_train.py --timeout (collectives, RPC)")
    p.add_argument("--json", metavar="PATH", help="write every run's figures and events here")
    p.add_argument("--write", action="store_true",
                   help=f"replace the generated part of the '{SECTION}' section of docs/reliability.md")
    p.add_argument("--log-dir", help="keep the runs' logs here (default: a temporary directory, removed)")
    p.add_argument("--report", metavar="PATH", nargs="+",
                   help="run nothing: print (and with --write, write) the tables of --json files saved before, "
                   "their runs in the order given")
    args = p.parse_args(argv)
    if args.duration <= 0:
        p.error("--duration must be > 0")
    if any(x < 0 for x in args.period) or (0 in args.period and len(args.period) > 1):
        p.error("--period: positive seconds, or 0 alone (fault-free run only)")
    if args.replicas < 2:
        p.error("--replicas must be >= 2 (a killed group heals from a live peer)")
    if args.k < 1 or args.rows < 1:
        p.error("--k and --rows must be >= 1")
    return args


def kill_times(duration: float, period: float) -> list[float]:
    """Seconds after the start at which a group is killed: P, 2P, ... strictly before D."""
    if period <= 0:
        return []
    n = int(duration // period)
    return [period * i for i in range(1, n + 1) if period * i < duration]


# -- the statistics (pure: event logs in, figures out) --------------------------------------------


def _median_max(xs: list[float]) -> dict[str, float | None]:
    return {"median": statistics.median(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs)}


def step_time(syncs: list[dict[str, Any]], k: int) -> float | None:
    """Median seconds per inner step: gaps between a process's consecutive syncs, less the later
    sync's own time, over k."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for e in syncs:
        by_pid.setdefault(e["pid"], []).append(e)
    per = [(b["t"] - a["t"] - b.get("sync_s", 0.0)) / k
           for es in by_pid.values() for a, b in pairwise(es)]
    per = [x for x in per if x > 0]
    return statistics.median(per) if per else None


def analyze(events: list[dict[str, Any]], kills: list[dict[str, Any]], spawns: list[dict[str, Any]],
            t0: float, duration: float, k: int, rows: int) -> dict[str, Any]:
    """The figures of one run.

    ``events``: the groups' JSON lines (ft_train.py --log: ready, sync, end); ``kills``: ``{t,
    replica, pid}`` per SIGKILL; ``spawns``: ``{t, replica, pid}`` per process started (the first
    ones and the restarts); ``t0``: when training started (the go file); ``duration``: the
    measured window; ``k``: inner steps per sync; ``rows``: rows per inner step per group."""
    events = sorted(events, key=lambda e: e["t"])
    syncs = [e for e in events if e["event"] == "sync"]
    t1 = t0 + duration
    useful = [e for e in syncs if e["committed"] and not e["healed"] and t0 <= e["t"] <= t1]
    samples = len(useful) * k * rows
    out: dict[str, Any] = {
        "duration_s": duration, "committed_samples": samples, "goodput": samples / duration,
        "committed_syncs": max((e["step"] for e in syncs if e["committed"] and e["t"] <= t1), default=0),
        "dropped_windows": sum(1 for e in syncs if not e["committed"] and t0 <= e["t"] <= t1),
        "failures": len(kills),
    }
    st = step_time(syncs, k)
    out["step_s"] = st
    kills = sorted(kills, key=lambda x: x["t"])
    per_failure = []
    for i, kill in enumerate(kills):
        tk, r = kill["t"], kill["replica"]
        t_next = kills[i + 1]["t"] if i + 1 < len(kills) else float("inf")
        spawn = next((s for s in sorted(spawns, key=lambda s: s["t"]) if s["replica"] == r and s["t"] >= tk), None)
        new_pid = spawn["pid"] if spawn else None
        before = [e for e in syncs if e["pid"] == kill["pid"] and e["t"] <= tk]
        last = before[-1]["t"] if before else None
        if last is None or st is None:
            killed_steps = k  # it never synced: count a whole window
        else:
            killed_steps = min(k, int((tk - last) / st))
        dropped = [e for e in syncs if not e["committed"] and tk <= e["t"] < t_next and e["pid"] != kill["pid"]]
        heal = next((e for e in syncs if e["pid"] == new_pid and e["committed"]), None)
        ready = next((e for e in events if e["pid"] == new_pid and e["event"] == "ready"), None)
        # The survivors' stall: their longest gap between syncs across the kill, up to the heal.
        t_heal = heal["t"] if heal is not None else t_next
        gaps = []
        for pid in {e["pid"] for e in syncs if e["pid"] not in (kill["pid"], new_pid)}:
            es = [e for e in syncs if e["pid"] == pid]
            gaps += [b["t"] - a["t"] for a, b in pairwise(es) if b["t"] >= tk and a["t"] <= t_heal]
        rec: dict[str, Any] = {
            "t_kill": tk - t0, "survivors_longest_gap": max(gaps) if gaps else None, "replica": r, "killed_steps": killed_steps, "dropped_windows": len(dropped),
            "steps_lost": killed_steps + k * len(dropped) + (k if heal is not None and heal["healed"] else 0),
            "healed": heal is not None and bool(heal["healed"]),
            "time_to_heal": (heal["t"] - tk) if heal is not None else None,
            "heal_step": heal["step"] if heal is not None else None,
        }
        if heal is not None and spawn is not None and ready is not None:
            start = heal["t"] - heal.get("sync_s", 0.0)
            rec["parts"] = {
                "kill_to_spawn": spawn["t"] - tk,
                "spawn_to_ready": ready["t"] - spawn["t"],
                "imports_and_manager": ready.get("startup_s"),
                "first_window": start - ready["t"],
                "quorum_and_heal": heal.get("quorum_s"),
                "rest_of_sync": heal.get("sync_s", 0.0) - (heal.get("quorum_s") or 0.0),
            }
        per_failure.append(rec)
    out["per_failure"] = per_failure
    out["steps_lost"] = _median_max([f["steps_lost"] for f in per_failure])
    out["time_to_heal"] = _median_max([f["time_to_heal"] for f in per_failure if f["time_to_heal"] is not None])
    out["survivors_longest_gap"] = _median_max([f["survivors_longest_gap"] for f in per_failure
                                                if f["survivors_longest_gap"] is not None])
    out["sync_interval"] = _median_max([b["t"] - a["t"] for pid in {e["pid"] for e in syncs}
                                        for a, b in pairwise([e for e in syncs if e["pid"] == pid])])
    out["not_healed"] = sum(1 for f in per_failure if f["time_to_heal"] is None)
    parts: dict[str, Any] = {}
    for name in ("kill_to_spawn", "spawn_to_ready", "imports_and_manager", "first_window", "quorum_and_heal",
                 "rest_of_sync"):
        xs = [f["parts"][name] for f in per_failure if "parts" in f and f["parts"][name] is not None]
        parts[name] = _median_max(xs)
    out["heal_parts"] = parts
    # Nothing committed lost: every group ends at the highest step any group ever committed, and no
    # committed sync (in time order) lands below a step committed before it by another live group.
    ends = [e for e in events if e["event"] == "end"]
    top = max((e["step"] for e in syncs if e["committed"]), default=0)
    out["final_steps"] = sorted({e["step"] for e in ends})
    out["committed_lost"] = max(0, top - min((e["step"] for e in ends), default=top))
    running, regressions = 0, 0
    for e in syncs:
        if e["committed"]:
            if e["step"] < running:
                regressions += 1
            running = max(running, e["step"] - 1)  # a peer in the same quorum may log step-1 -> step later
    out["step_regressions"] = regressions
    checks = {e["replica"]: e["checksum"] for e in ends}
    out["final_checksums"] = checks
    out["checksums_identical"] = len(set(checks.values())) == 1 if checks else False
    return out


# -- running it ------------------------------------------------------------------------------------


def _lighthouse_exe() -> str:
    exe = Path(sys.executable).parent / "torchft_lighthouse"
    return str(exe) if exe.exists() else (shutil.which("torchft_lighthouse") or "torchft_lighthouse")


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    import socket

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"torchft_lighthouse exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"torchft_lighthouse did not listen on {port} within {timeout} s")


def _read_events(log_dir: Path) -> list[dict[str, Any]]:
    events = []
    for path in sorted(log_dir.glob("events_r*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return events


def _eval_final(out_dir: Path, replicas: int, seed: int) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT / "launch"))
    from train_example import build_model, global_batch

    x, y = global_batch(10_000 + seed, 0, EVAL_ROWS)
    states, losses = [], {}
    for r in range(replicas):
        path = out_dir / f"final_r{r}.pt"
        if not path.exists():
            continue
        sd = torch.load(path, map_location="cpu", weights_only=False)["model"]
        model = build_model(seed)
        model.load_state_dict(sd)
        with torch.no_grad():
            losses[r] = float(torch.nn.functional.mse_loss(model(x), y))
        states.append(sd)
    same = len(states) == replicas and all(
        all(torch.equal(a[n], b[n]) for n in a) for a, b in pairwise(states))
    return {"eval_loss": losses, "bitwise_identical": same, "saved": len(states)}


def run_once(args: argparse.Namespace, period: float, work: Path) -> dict[str, Any]:
    """One run: lighthouse, the groups, kills every ``period`` s (0: none) for ``--duration`` s."""
    from lookahead_dist.distributed import free_port

    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TORCHFT_LIGHTHOUSE": f"http://localhost:{port}"}
    lh_log = open(work / "lighthouse.log", "w")  # noqa: SIM115 - open for the whole run, closed below
    lighthouse = subprocess.Popen(
        [_lighthouse_exe(), "--min_replicas", "1", "--quorum_tick_ms", "100", "--bind", f"[::]:{port}",
         "--heartbeat_timeout_ms", str(args.heartbeat_ms), "--join_timeout_ms", str(args.join_timeout_ms)],
        stdout=lh_log, stderr=subprocess.STDOUT, env=env)
    go, stop = work / "go", work / "stop"
    procs: dict[int, subprocess.Popen] = {}
    spawns: list[dict[str, Any]] = []
    kills: list[dict[str, Any]] = []
    outs = []

    def start(r: int) -> None:
        out = open(work / f"group_r{r}.log", "a")  # noqa: SIM115 - the process's output, closed below
        outs.append(out)
        cmd = [sys.executable, str(FT_TRAIN), "--replica", str(r), "--groups", str(args.replicas),
               "--lighthouse", f"http://localhost:{port}", "--syncs", str(10**9), "--k", str(args.k),
               "--batch", str(args.rows * args.replicas), "--seed", str(args.seed),
               "--step-sleep", str(args.step_sleep), "--timeout", str(args.timeout),
               "--log", str(work / f"events_r{r}.jsonl"), "--out", str(work / "final"),
               "--stop-file", str(stop), "--go-file", str(go)]
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        procs[r] = p
        spawns.append({"t": time.time(), "replica": r, "pid": p.pid})

    def up(r: int, events: list[dict[str, Any]]) -> bool:
        pid = procs[r].pid
        return procs[r].poll() is None and any(
            e["pid"] == pid and e["event"] == "sync" and e["committed"] for e in events)

    try:
        _wait_port(port, lighthouse)
        for r in range(args.replicas):
            start(r)
        deadline = time.time() + 180
        while True:  # every group ready (imports done, manager up) before the clock starts
            ready = {e["replica"] for e in _read_events(work) if e["event"] == "ready"}
            if len(ready) == args.replicas:
                break
            dead = [r for r, p in procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"groups {dead or 'not ready'} before the start; see {work}")
            time.sleep(0.1)
        t0 = time.time()
        go.write_text("go")
        rng = random.Random(args.seed * 1000 + int(period * 1000))
        for tk in kill_times(args.duration, period):
            while time.time() < t0 + tk:
                time.sleep(0.05)
            events = _read_events(work)
            alive = [r for r in range(args.replicas) if up(r, events)] or list(range(args.replicas))
            r = rng.choice(alive)
            victim = procs[r]
            t = time.time()
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            kills.append({"t": t, "replica": r, "pid": victim.pid})
            print(f"[soak P={period:g}] {t - t0:7.1f} s: kill -9 group {r} (pid {victim.pid})", flush=True)
            start(r)
        while time.time() < t0 + args.duration:
            time.sleep(0.1)
        # Stop: wait until every group is up (a restarted one has healed), then one more sync for all.
        deadline = time.time() + 120
        while not all(up(r, _read_events(work)) for r in range(args.replicas)) and time.time() < deadline:
            time.sleep(0.2)
        top = max((e["step"] for e in _read_events(work) if e["event"] == "sync"), default=0)
        stop.write_text(str(top + 2))
        deadline = time.time() + 120
        for r, p in procs.items():
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                print(f"[soak] group {r} did not end; killing it", file=sys.stderr)
                p.kill()
                p.wait()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        lighthouse.terminate()
        try:
            lighthouse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lighthouse.kill()
        for f in [lh_log, *outs]:
            f.close()
    events = _read_events(work)
    res = analyze(events, kills, spawns, t0, args.duration, args.k, args.rows)
    res.update(_eval_final(work / "final", args.replicas, args.seed))
    res["period_s"] = period
    res.update(heartbeat_ms=args.heartbeat_ms, join_timeout_ms=args.join_timeout_ms,
               samples_per_sync=args.replicas * args.k * args.rows)
    res["exit_codes"] = {r: p.returncode for r, p in procs.items()}
    res["identical"] = bool(res["checksums_identical"] and res["bitwise_identical"])
    res["t0"] = t0  # the events' times are absolute; kills' and spawns' are relative to t0
    res["events"] = events
    res["kills"] = [{**x, "t": x["t"] - t0} for x in kills]
    res["spawns"] = [{**x, "t": x["t"] - t0} for x in spawns]
    return res


# -- the report ------------------------------------------------------------------------------------


def _fmt_mm(mm: dict[str, Any], fmt: str = ".1f", unit: str = "") -> str:
    if mm.get("median") is None:
        return "-"
    return f"{format(mm['median'], fmt)}{unit} / {format(mm['max'], fmt)}{unit}"


def _name(r: dict[str, Any]) -> str:
    name = "fault-free" if r["period_s"] == 0 else f"kill every {r['period_s']:g} s"
    if (r.get("heartbeat_ms", 5000), r.get("join_timeout_ms", 10000)) != (5000, 10000):
        name += f" (heartbeat {r['heartbeat_ms'] / 1000:g} s, join {r['join_timeout_ms'] / 1000:g} s)"
    return name


def own_rate_ratio(r: dict[str, Any]) -> float | None:
    """Goodput over the rate the same run commits at when nothing is wrong: all groups, one sync per
    median gap between syncs. Independent of the host's load in other runs."""
    gap = (r.get("sync_interval") or {}).get("median")
    per_sync = r.get("samples_per_sync")
    return r["goodput"] * gap / per_sync if gap and per_sync else None


def _loss(r: dict[str, Any]) -> float:
    return statistics.mean(r["eval_loss"].values()) if r["eval_loss"] else float("nan")


def table(runs: list[dict[str, Any]]) -> str:
    """One row per run, in the order run. A faulty run is compared with the nearest fault-free run
    before it and after it in the list."""
    lines = [("| run | goodput (samples/s) | vs fault-free before / after | vs its own undisturbed rate | "
              "failures | steps lost per failure (median / max) | time to heal (median / max) | "
              "committed steps lost | final loss (vs fault-free before / after) | replicas identical |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    free = [i for i, r in enumerate(runs) if r["period_s"] == 0]
    for i, r in enumerate(runs):
        pair = [next((runs[j] for j in reversed(free) if j < i), None), next((runs[j] for j in free if j > i), None)]
        if r["period_s"] == 0:
            ratio, vs = "-", ""
        else:
            ratio = " / ".join(f"{100 * r['goodput'] / b['goodput']:.1f} %" if b and b["goodput"] else "-"
                               for b in pair)
            vs = " (" + " / ".join(f"{_loss(r) / _loss(b):.3f}x" if b else "-" for b in pair) + ")"
        own = own_rate_ratio(r)
        lines.append(
            f"| {_name(r)} | {r['goodput']:.1f} | {ratio} | {f'{100 * own:.1f} %' if own else '-'} | "
            f"{r['failures']} | {_fmt_mm(r['steps_lost'], '.0f')} | {_fmt_mm(r['time_to_heal'], '.1f', ' s')} | "
            f"{r['committed_lost']} | {_loss(r):.4f}{vs} | {'yes' if r['identical'] else 'no'} |")
    return "\n".join(lines)


def parts_table(runs: list[dict[str, Any]]) -> str:
    names = [("kill_to_spawn", "kill -> new process"), ("spawn_to_ready", "new process -> ready"),
             ("imports_and_manager", "of which: imports + Manager (ft_train.py's startup_s)"),
             ("first_window", "ready -> first sync (k inner steps)"),
             ("quorum_and_heal", "first sync: quorum wait + heal"), ("rest_of_sync", "first sync: the rest")]
    faulty = [r for r in runs if r["period_s"] > 0]
    if not faulty:
        return ""
    extra = [("survivors_longest_gap", "the survivors' longest gap between syncs, kill -> heal"),
             ("sync_interval", "for scale: gap between syncs over the whole run")]
    head = "| part of the time to heal (median / max) | " + " | ".join(_name(r) for r in faulty) + " |"
    lines = [head, "|---|" + "---|" * len(faulty)]
    for key, label in names:
        lines.append(f"| {label} | " + " | ".join(_fmt_mm(r["heal_parts"][key], ".2f", " s") for r in faulty) + " |")
    for key, label in extra:
        lines.append(f"| {label} | " + " | ".join(_fmt_mm(r.get(key, {}), ".2f", " s") for r in faulty) + " |")
    return "\n".join(lines)


def command_line(args: argparse.Namespace) -> str:
    periods = " ".join(f"{p:g}" for p in args.period)
    cmd = (f"OMP_NUM_THREADS=1 python -m benchmarks.soak --duration {args.duration:g} --period {periods} "
           f"--replicas {args.replicas} --seed {args.seed}")
    if (args.k, args.step_sleep, args.rows) != (16, 0.05, 16):
        cmd += f" --k {args.k} --step-sleep {args.step_sleep:g} --rows {args.rows}"
    if (args.heartbeat_ms, args.join_timeout_ms) != (5000, 10000):
        cmd += f" --heartbeat-ms {args.heartbeat_ms} --join-timeout-ms {args.join_timeout_ms}"
    return cmd + (f" --json {args.json}" if args.json else "") + (" --write" if args.write else "")


def generated(sets: list[dict[str, Any]]) -> str:
    """The generated part of the section from one or more saved runs (``--json`` files)."""
    runs = [r for d in sets for r in d["runs"]]
    a = sets[0]["args"]
    out = [BEGIN]
    out += [f"Command: `{d['command']}`  \nMachine: {d['machine']}  " for d in sets]
    out += [(f"Setup: {a['replicas']} replica groups of one process each (gloo), a lighthouse (quorum tick 100 ms; "
             "heartbeat and join timeouts: torchft's 5 s and 10 s unless the row says otherwise); "
             f"`Lookahead(AdamW, k={a['k']})` through the manager; {a['rows']} rows per inner step per group, "
             f"{a['step_sleep']:g} s of pretend compute per inner step; runs of {a['duration']:g} s, one after "
             "another in the order of the table."), "", table(runs), "", parts_table(runs), END]
    return "\n".join(out)


def load_runs(path: str) -> dict[str, Any]:
    """A ``--json`` file, its runs completed with the settings they ran under (older files lack them)."""
    data = json.loads(Path(path).read_text())
    a = data["args"]
    for r in data["runs"]:
        r.setdefault("heartbeat_ms", a["heartbeat_ms"])
        r.setdefault("join_timeout_ms", a["join_timeout_ms"])
        r.setdefault("samples_per_sync", a["replicas"] * a["k"] * a["rows"])
    return data


def write_doc(text: str) -> None:
    doc = RELIABILITY.read_text()
    if BEGIN in doc and END in doc:
        doc = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: text, doc, flags=re.DOTALL)
    else:
        doc = doc.rstrip() + f"\n\n## {SECTION}\n\n{text}\n"
    RELIABILITY.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        sets = [load_runs(path) for path in args.report]
        runs = [r for d in sets for r in d["runs"]]
        print(table(runs))
        print()
        print(parts_table(runs))
        if args.write:
            write_doc(generated(sets))
        return 0
    periods = [0.0] + [p for p in args.period if p > 0]
    tmp = None
    if args.log_dir:
        base = Path(args.log_dir)
    else:
        tmp = tempfile.mkdtemp(prefix="soak.")
        base = Path(tmp)
    runs = []
    try:
        for period in periods:
            print(f"[soak] run: {'fault-free' if period == 0 else f'kill every {period:g} s'}, "
                  f"{args.duration:g} s; logs in {base}", flush=True)
            res = run_once(args, period, base / f"p{period:g}")
            runs.append(res)
            brief = {k: v for k, v in res.items() if k not in ("events", "per_failure", "spawns")}
            print(json.dumps(brief, default=str), flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(runs))
    print()
    print(parts_table(runs))
    from benchmarks._docs import machine

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"command": command_line(args), "machine": machine(), "args": vars(args), "runs": runs},
            separators=(",", ":")))
    if args.write:
        write_doc(generated([{"command": command_line(args), "machine": machine(), "args": vars(args),
                              "runs": runs}]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
