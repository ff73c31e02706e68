"""Throughput driver: each configured row on 1/2/4 simulated nodes over a shaped link, as a table.

For every node count N (one cluster from tools/netcluster.py per N, one rank per node) and every row
(a training mode with its options), the training command runs under multi-node torchrun; the last
JSON line that rank 0 prints is its result. Columns:

* samples/s: global samples per second over the timed steps (all ranks);
* scaling efficiency: ``samples_per_s(N) / (N * samples_per_s(1))`` for the same row (1.0 = linear);
* bytes/step: bytes handed to all-reduce per rank per step (counted by the trainer);
* wire bytes/step: node 0's eth0 tx_bytes per step (measured in its namespace; GSO super-packets,
  so TCP/IP framing is mostly not in it);
* final loss: mean over ranks of the last step's training loss.

The command is a template; ``{mode} {k} {alpha} {steps}`` and any ``--set name=value`` are filled
in per row. Until ``lookahead-dist train`` exists, the default template is the stand-in
``benchmarks/_standin_train.py`` (an MLP, DDP or local SGD). A template whose first word is not a
``.py`` file is run by torchrun with ``--no-python`` (e.g. ``lookahead-dist train ...``).

Run (root; short smoke run)::

    python -m benchmarks.throughput --nodes 1,2 --rate 100mbit --steps 10 \\
        --rows ddp,local-sgd:k=4,local-sgd:k=16
    python -m benchmarks.throughput --command "lookahead-dist train --mode {mode} --k {k} \\
        --alpha {alpha} --steps {steps}" --rows ddp,zero2,fsdp2,local-sgd:k=16

Writing results to docs/benchmarks.md is left to the full benchmark run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "benchmarks" / "_standin_train.py"
DEFAULT_COMMAND = f"{STANDIN} --mode {{mode}} --k {{k}} --alpha {{alpha}} --steps {{steps}}"
DEFAULT_ROWS = "ddp,local-sgd:k=4,local-sgd:k=16,local-sgd:k=64"
ROW_DEFAULTS = {"k": "1", "alpha": "1.0"}


@dataclass
class Row:
    """One table row: a mode and its options, e.g. ``local-sgd:k=16,alpha=0.5``."""

    mode: str
    opts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Row":
        mode, _, rest = text.partition(":")
        if not mode.strip():
            raise ValueError(f"row {text!r} has no mode (expected e.g. 'ddp' or 'local-sgd:k=16')")
        opts = {}
        for item in filter(None, (s.strip() for s in rest.split(";" if ";" in rest else ","))):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"row option {item!r} in {text!r} is not name=value")
            opts[key.strip()] = value.strip()
        return cls(mode.strip(), opts)

    @property
    def label(self) -> str:
        return self.mode + "".join(f" {k}={v}" for k, v in self.opts.items())


def split_rows(spec: str) -> list[Row]:
    """``"ddp,local-sgd:k=4,local-sgd:k=16;alpha=0.5"``: rows split at commas that start a new mode."""
    rows: list[str] = []
    for piece in spec.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if rows and "=" in piece and ":" not in piece:
            rows[-1] += ";" + piece  # an option continuing the previous row, e.g. "...:k=16,alpha=0.5"
        else:
            rows.append(piece)
    return [Row.parse(r) for r in rows]


def fill(template: str, row: Row, steps: int, extra: dict[str, str]) -> list[str]:
    values = dict(ROW_DEFAULTS, **extra, **row.opts, mode=row.mode, steps=str(steps))
    argv = shlex.split(template)
    out = []
    for a in argv:
        try:
            out.append(a.format(**values))
        except KeyError as e:
            raise ValueError(f"template placeholder {e} has no value; pass --set {e.args[0]}=...") from None
    return out


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "samples_per_s" in obj:
                return obj
    return None


def run_matrix(rows: list[Row], nodes: list[int], *, rate: str, delay_ms: float, steps: int, template: str,
               extra: dict[str, str], timeout: float, master_port: int = 29600, echo: bool = False) -> list[dict]:
    from tools.netcluster import Cluster, torchrun_argv

    results = []
    port = master_port
    for n in nodes:
        with Cluster(n, rate, delay_ms=delay_ms, master_port=port) as c:
            for row in rows:
                c.master_port = port  # a fresh port per job: the last job's may sit in TIME_WAIT
                port += 1
                argv = torchrun_argv(fill(template, row, steps, extra))  # .py or --no-python
                rec = {"row": row.label, "nodes": n}
                try:
                    res = c.run(argv, timeout=timeout, echo=echo)
                except TimeoutError as e:
                    rec["error"] = f"timeout: {e}"
                    results.append(rec)
                    print(f"[{row.label} @ {n} node(s)] {rec['error']}", file=sys.stderr, flush=True)
                    continue
                parsed = last_json(res[0].output())
                if any(r.returncode != 0 for r in res) or parsed is None:
                    bad = next((r for r in res if r.returncode != 0), res[0])
                    rec["error"] = f"node {bad.node_rank} exit {bad.returncode}: {error_line(bad.output())[:200]}"
                else:
                    rec.update(parsed)
                results.append(rec)
                print(f"[{row.label} @ {n} node(s)] " + (rec.get("error") or
                      f"{rec['samples_per_s']:.0f} samples/s"), file=sys.stderr, flush=True)
    return results


_TORCHRUN_FAIL_RE = re.compile(r"^E\d{4} .*failed \(exitcode")


def error_line(text: str) -> str:
    """The worker's own last words: the line before torchrun's failure report, else the last line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if _TORCHRUN_FAIL_RE.match(ln) and i > 0:
            return lines[i - 1].strip()
    return lines[-1].strip() if lines else "(no output)"


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def table(results: list[dict]) -> str:
    base = {r["row"]: r["samples_per_s"] for r in results if r["nodes"] == 1 and "samples_per_s" in r}
    lines = ["| row | nodes | samples/s | scaling efficiency | bytes/step (all-reduce) | wire bytes/step "
             "| final loss |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['nodes']} | failed: {r['error']} | | | | |")
            continue
        eff = (f"{r['samples_per_s'] / (r['nodes'] * base[r['row']]):.2f}" if r["row"] in base else "n/a")
        lines.append(f"| {r['row']} | {r['nodes']} | {r['samples_per_s']:.0f} | {eff} "
                     f"| {_fmt_bytes(r['allreduce_bytes_per_step'])} | {_fmt_bytes(r.get('wire_tx_bytes_per_step'))} "
                     f"| {r['final_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="throughput/scaling/bytes table on the simulated cluster")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated rows (default {DEFAULT_ROWS})")
    p.add_argument("--nodes", default="1,2,4", help="node counts (default 1,2,4)")
    p.add_argument("--rate", default="1gbit", help="link rate per node and direction (default 1gbit)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--command", default=DEFAULT_COMMAND, help="training command template")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="value for an extra {NAME} placeholder in the template")
    p.add_argument("--timeout", type=float, default=600.0, help="per job")
    p.add_argument("--json-out", default=None, help="write the raw results here")
    p.add_argument("--echo", action="store_true", help="show the nodes' output")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from tools.netcluster import unavailable_reason

    try:
        rows = split_rows(args.rows)
        nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
        extra = dict(kv.split("=", 1) for kv in args.set)
        for row in rows:  # fail on a bad template before building anything
            fill(args.command, row, args.steps, extra)
    except ValueError as e:
        p.error(str(e))
    reason = unavailable_reason()
    if reason:
        print(f"throughput: cannot build a cluster on this host: {reason}", file=sys.stderr)
        return 77
    results = run_matrix(rows, nodes, rate=args.rate, delay_ms=args.delay_ms, steps=args.steps,
                         template=args.command, extra=extra, timeout=args.timeout, echo=args.echo)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
