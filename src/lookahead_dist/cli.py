"""The ``lookahead-dist`` command: train a small language model across local ranks, or compare set-ups.

::

    lookahead-dist train --mode fsdp2 --steps 100        # one run, 2 ranks, summary table
    lookahead-dist compare                                # AdamW vs Lookahead under every mode
    lookahead-dist compare --quick --json results.json    # CI-sized, also as JSON

Exit status: 0 success, 1 a run failed (or was unavailable for ``train``, or the ``demo`` extra is
not installed), 2 bad command line.
Ranks are spawned on this machine (gloo on CPU, NCCL on CUDA GPUs); under ``torchrun`` the
command runs as one rank of the launcher's job instead (``torchrun --nproc-per-node 2 --no-python
lookahead-dist train ...``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# The names of the modes have one home, the demo's config module (it imports only torch); the
# demo's heavier modules are imported once there is something to run.
from .demo.config import (
    BASELINE_MODES,
    COMM_DTYPES,
    MODES,
    OPTIMIZERS,
    STREAMING_MODES,
    WIRE_MODES,
)

__all__ = ["main", "build_parser", "DEFAULT_RUNS"]

#: What ``compare`` runs by default: the AdamW baseline, then Lookahead(AdamW) under every mode.
DEFAULT_RUNS = ("ddp:adamw", "ddp:lookahead", "zero2:lookahead", "fsdp2:lookahead", "local-sgd:lookahead")
#: Defaults of the training shape (``train`` and ``compare``) and their ``--quick`` values.
DEFAULTS = {"steps": 300, "batch_size": 32, "eval_batches": 8}
QUICK = {"steps": 20, "batch_size": 8, "eval_batches": 2}
#: Modules the demo needs beyond the library's own dependency (torch), and the extra that installs them.
DEMO_REQUIRES = ("tqdm",)
DEMO_EXTRA = "demo"


class UsageError(Exception):
    """A bad command line detected after parsing (exit status 2)."""


# -- argument types: messages name the bad value ------------------------------------------------
def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def _float_in(what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float for which ``ok`` holds (NaN never does); errors say ``expected {what}``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what
    return parse


_alpha = _float_in("a number in (0, 1]", lambda v: 0.0 < v <= 1.0)
_positive_float = _float_in("a positive number", lambda v: 0.0 < v < math.inf)
_nonnegative_float = _float_in("a number >= 0", lambda v: 0.0 <= v < math.inf)
_unit_interval = _float_in("a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
_momentum = _float_in("a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
_fraction = _float_in("a number in (0, 1]", lambda v: 0.0 < v <= 1.0)


def _eager_rule(text: str) -> str:
    if text != "naive":
        raise argparse.ArgumentTypeError(f"expected no value (the eager rule) or 'naive', got {text!r}")
    return text


def _block_size(text: str) -> int:
    value = _int_at_least(2)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"expected an even integer >= 2 (two int4 codes per byte), got {value}")
    return value


def _default_optimizer(mode: str) -> str:
    # The other libraries' local SGD (benchmark baselines) wraps plain AdamW.
    return "adamw" if mode in BASELINE_MODES else "lookahead"


def _run_spec(text: str) -> tuple[str, str]:
    mode, sep, optimizer = text.partition(":")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r} in {text!r}; modes: {', '.join(MODES)}")
    optimizer = optimizer if sep else _default_optimizer(mode)
    if optimizer not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {optimizer!r} in {text!r}; optimizers: {', '.join(OPTIMIZERS)}"
        )
    return mode, optimizer


def _run_list(text: str) -> list[tuple[str, str]]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of MODE[:OPTIMIZER], got {text!r}")
    return [_run_spec(s) for s in specs]


# -- the parser -----------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    la = p.add_argument_group("Lookahead")
    la.add_argument("--k", type=_int_at_least(1), default=5, help="sync period in inner steps (default: 5)")
    la.add_argument("--alpha", type=_alpha, default=0.5, help="slow step size in (0, 1] (default: 0.5)")

    ls = p.add_argument_group("local-sgd mode")
    ls.add_argument("--outer-momentum", type=_momentum, default=0.0,
                    help="outer momentum beta in [0, 1) of the slow step (default: 0 = Lookahead)")
    ls.add_argument("--nesterov", action="store_true", help="Nesterov outer momentum (DiLoCo)")
    ls.add_argument("--local-sgd-sharded", dest="sharded", action="store_true",
                    help="each rank keeps 1/N of the slow weights (reduce-scatter + all-gather)")
    ls.add_argument("--comm-dtype", choices=COMM_DTYPES, default="fp32",
                    help="dtype of the averaged progress on the wire; int8/int4/int2: blockwise absmax-quantised, "
                    "summed in fp32 (default: fp32)")
    ls.add_argument("--quant-block-size", type=_block_size, default=512,
                    help="values per fp32 scale with --comm-dtype int8/int4/int2 (even; default: 512)")
    ls.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=True,
                    help="with --comm-dtype int8/int4/int2, carry each rank's quantisation error into its next send "
                    "(default: on)")
    ls.add_argument("--eager-update", nargs="?", const=True, default=False, type=_eager_rule, metavar="naive",
                    help="apply each sync's collective at the next sync (the transfer overlaps a whole inner "
                    "phase), with the eager rule (own fresh outer gradient for its share); '--eager-update "
                    "naive': the delayed average alone, for comparison (default: off)")
    ls.add_argument("--topk-fraction", type=_fraction, default=None, metavar="F",
                    help="send only this fraction of the outer gradient (top-k per block of 256 values, at the "
                    "bits of --comm-dtype int8/int4/int2, exchanged by all-gather), e.g. 0.02 (default: dense)")
    ls.add_argument("--fused-kernels", action="store_true",
                    help="with --comm-dtype int8/int4/int2: quantise with torch.compile'd kernels (the same numbers, "
                    "fewer passes; each compiles at its first sync; a CPU needs a C++ compiler)")
    ls.add_argument("--num-fragments", type=_int_at_least(1), default=1,
                    help="streaming (local-sgd, torchft-diloco): F fragments synced at staggered steps, each 1/F "
                    "of the model; k must be a multiple of F (default: 1)")
    ls.add_argument("--fragment-sync-delay", type=_int_at_least(0), default=0,
                    help="streaming: tau inner steps between a fragment's send and its application; the "
                    "transfer overlaps them; tau < k / F (default: 0 = blocking)")
    ls.add_argument("--fragment-update-alpha", type=_unit_interval, default=0.0,
                    help="streaming: share of the local weights kept when a fragment's result is applied, in "
                    "[0, 1] (default: 0 = take the new global weights)")
    ls.add_argument("--hierarchical", action="store_true",
                    help="DDP among the ranks of a node (LOCAL_WORLD_SIZE), local SGD across nodes")

    tr = p.add_argument_group("training")
    tr.add_argument("--steps", type=_int_at_least(1), default=None,
                    help=f"optimizer steps per run (default: {DEFAULTS['steps']}; --quick: {QUICK['steps']})")
    tr.add_argument("--batch-size", type=_int_at_least(1), default=None,
                    help="sequences per step over all ranks, divisible by --nproc "
                    f"(default: {DEFAULTS['batch_size']}; --quick: {QUICK['batch_size']})")
    tr.add_argument("--lr", type=_positive_float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    tr.add_argument("--weight-decay", type=_nonnegative_float, default=0.01, help="AdamW weight decay (default: 0.01)")
    tr.add_argument("--grad-clip", type=_nonnegative_float, default=1.0,
                    help="clip the global gradient norm before each step; 0 turns it off (default: 1.0)")
    tr.add_argument("--seed", type=_int_at_least(0), default=0, help="model init and batch order (default: 0)")
    tr.add_argument("--eval-batches", type=_int_at_least(1), default=None,
                    help=f"validation batches for the final val loss (default: {DEFAULTS['eval_batches']})")
    tr.add_argument("--quick", action="store_true",
                    help="CI-sized run: %(steps)s steps, batch %(batch_size)s, %(eval_batches)s eval batches "
                    "(explicit flags still win)" % QUICK)

    mo = p.add_argument_group("model (byte-level transformer LM)")
    mo.add_argument("--seq-len", type=_int_at_least(2), default=64, help="context length in bytes (default: 64)")
    mo.add_argument("--layers", type=_int_at_least(1), default=2, help="transformer blocks (default: 2)")
    mo.add_argument("--d-model", type=_int_at_least(1), default=128, help="model width (default: 128)")
    mo.add_argument("--heads", type=_int_at_least(1), default=4, help="attention heads, divide --d-model (default: 4)")

    ru = p.add_argument_group("ranks and output")
    ru.add_argument("--nproc", type=_int_at_least(1), default=None,
                    help="local ranks to spawn (default: 2; under torchrun: its WORLD_SIZE)")
    ru.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA (NCCL) when at least --nproc GPUs are visible, else CPU (gloo) (default: auto)")
    ru.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the results as JSON to PATH; without PATH (or '-') print JSON instead of the table")
    ru.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on rank 0 (default: only on a terminal)")
    ru.add_argument("-v", "--verbose", action="store_true", help="show a failing rank's full traceback")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookahead-dist",
        description="Lookahead for distributed PyTorch: train a small transformer language model on "
        "Python's own documentation text (no downloads) across local ranks, under DDP, DeepSpeed "
        "ZeRO-2, FSDP2 or local SGD.",
        epilog="Exit status: 0 ok, 1 a run failed, 2 bad command line. '%(prog)s COMMAND --help' for details.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="one training run with a summary table",
        description="Train the demo model on N local ranks and print loss, throughput, communication "
        "per step and slow-weight memory per rank.",
    )
    train.add_argument("--mode", choices=MODES, default="ddp",
                       help="ddp: DDP; zero2: DeepSpeed ZeRO-2 (Lookahead as client optimizer); fsdp2: "
                       "fully_shard; local-sgd: no per-step all-reduce, weights averaged every k steps; "
                       "post-local-sgd / accelerate-local-sgd: torch's PostLocalSGDOptimizer / accelerate's "
                       "LocalSGD around AdamW, for comparison; torchft-diloco: torchft's DiLoCo around AdamW "
                       "(outer SGD lr=--alpha, same --k and fragment flags; each rank a replica group; needs a "
                       "lighthouse at $TORCHFT_LIGHTHOUSE); traffic-only: a never-syncing Lookahead beside a bare "
                       "async all-reduce of a fragment's wire bytes every k/F steps (a benchmark control) "
                       "(default: ddp)")
    opt = train.add_mutually_exclusive_group()
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                     help="adamw, or lookahead = Lookahead(AdamW) (default: lookahead; adamw for the "
                     "post-local-sgd and accelerate-local-sgd baselines)")
    opt.add_argument("--lookahead", dest="optimizer", action="store_const", const="lookahead",
                     help="same as --optimizer lookahead")
    opt.add_argument("--no-lookahead", dest="optimizer", action="store_const", const="adamw",
                     help="same as --optimizer adamw")
    _add_common(train)
    train.set_defaults(subparser=train)

    compare = sub.add_parser(
        "compare", help="several runs side by side in one table",
        description="Run several configurations one after another (same data, same initial weights) "
        "and print one table.",
    )
    compare.add_argument("--runs", type=_run_list, default=None, metavar="MODE[:OPT],...",
                         help="what to run, e.g. 'ddp:adamw,fsdp2:lookahead' (optimizer defaults to "
                         f"lookahead) (default: {','.join(DEFAULT_RUNS)})")
    _add_common(compare)
    compare.set_defaults(subparser=compare)
    _add_plan(sub)
    return parser


# -- plan: the cost model's recommendation (lookahead_dist.plan) ---------------------------------
_DEFAULT_PROBE_PORT = 29650  # lookahead_dist.linkprobe.DEFAULT_PORT, without importing it at start-up
def _parsed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse type from one of lookahead_dist.plan's parsers (its ValueError becomes the message)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what
    return convert


def _positive_seconds(text: str) -> float:
    from .plan import parse_seconds

    value = parse_seconds(text)
    if value <= 0:
        raise ValueError(f"expected a positive duration, got {text!r}")
    return value


def _add_plan(sub: Any) -> None:
    from . import plan as _p

    p = sub.add_parser(
        "plan", help="recommend k, fragments, delay and wire format for a cluster (cost model)",
        description="Predict the throughput of DDP and of local SGD (blocking and streaming, fp32/bf16/int8/int4 "
        "on the wire) from the model size, the step time and the link, with an alpha-beta model of the "
        "collectives (lookahead_dist.plan), and print the recommended option with the config to paste.",
        epilog="The model: docs/benchmarks.md, 'Scaling: the cost model'. Exit status: 0 ok, 2 bad command line.",
    )
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=_parsed(_p.parse_count, "count"), metavar="COUNT",
                      help="number of parameters, e.g. 1300000000, 1.3B, 350M")
    size.add_argument("--model-file", metavar="PATH",
                      help="a torch-saved state dict (.pt); the numels of its tensors are summed")
    step = p.add_mutually_exclusive_group(required=True)
    step.add_argument("--step-time", type=_parsed(_positive_seconds, "duration"), metavar="SECONDS",
                      help="one inner step (forward, backward, optimizer) measured without communication, "
                      "e.g. 0.5, 0.5s, 250ms")
    step.add_argument("--step-time-cmd", metavar="CMD",
                      help="measure the step time: CMD (a shell command containing {steps}, e.g. \"python "
                      "train.py --steps {steps}\") is run with two step counts (--step-time-steps) on one "
                      "node without communication; step time = difference of wall times / difference of steps, "
                      "so start-up and set-up cancel out")
    p.add_argument("--step-time-steps", default="5,25", metavar="A,B",
                   help="the two step counts of --step-time-cmd (default: 5,25)")
    p.add_argument("--nodes", type=_int_at_least(1), required=True, help="nodes (local-SGD replicas), >= 1")
    p.add_argument("--ranks-per-node", type=_int_at_least(1), default=1,
                   help="ranks per node; > 1: DDP inside each node, local SGD across nodes (default: 1)")
    link = p.add_mutually_exclusive_group(required=True)
    link.add_argument("--link", type=_parsed(_p.parse_rate, "rate"), metavar="RATE",
                      help="each node's inter-node bandwidth: 200Mbit, 1Gbit, 10Gbit/s, 100Mbps (bits/s) or "
                      "125MB/s (bytes/s)")
    link.add_argument("--probe", metavar="HOST[:PORT]",
                      help="measure the link (upload bandwidth and latency) to `lookahead-dist probe-server` "
                      f"running on another node (port default {_DEFAULT_PROBE_PORT}); sets --latency too")
    p.add_argument("--probe-bytes", type=_parsed(_p.parse_count, "count"), default=16 << 20, metavar="BYTES",
                   help="bytes per --probe transfer, e.g. 16M (default: 16M; 3 transfers, the median kept)")
    p.add_argument("--latency", type=_parsed(_p.parse_seconds, "duration"), default=None, metavar="SECONDS",
                   help="latency per message on the inter-node link, e.g. 1ms, 50us (default: 1ms, or the "
                   "measured one with --probe)")
    p.add_argument("--intra-link", type=_parsed(_p.parse_rate, "rate"), default=_p.DEFAULT_INTRA_LINK.bandwidth,
                   metavar="RATE", help="bandwidth inside a node, with --ranks-per-node > 1 (default: 100GB/s)")
    p.add_argument("--intra-latency", type=_parsed(_p.parse_seconds, "duration"),
                   default=_p.DEFAULT_INTRA_LINK.latency, metavar="SECONDS",
                   help="latency inside a node (default: 10us)")
    p.add_argument("--k", type=_int_at_least(1), default=None,
                   help=f"fix the sync period instead of choosing it from {', '.join(map(str, _p.DEFAULT_K_CHOICES))}")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="slow step size in the printed config (default: 0.5)")
    p.add_argument("--target", type=_float_in("a number in (0, 1]", lambda v: 0.0 < v <= 1.0), default=0.95,
                   help="utilisation to reach; the least stale option reaching it is recommended (default: 0.95)")
    p.add_argument("--max-delay", type=_int_at_least(0), default=5,
                   help="largest fragment_sync_delay (tau) considered (default: 5, the Streaming-DiLoCo advice)")
    p.add_argument("--ddp-overlap", type=_unit_interval, default=2.0 / 3.0,
                   help="share of a step DDP's gradient all-reduce overlaps (default: 0.67, the backward pass)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per option considered (DDP first), instead of the text")
    p.set_defaults(subparser=p)

    server = sub.add_parser(
        "probe-server", help="answer `lookahead-dist plan --probe` from another node (link measurement)",
        description="Listen for link probes (lookahead_dist.linkprobe): round trips and timed uploads over TCP. "
        "Stop it with Ctrl-C.")
    server.add_argument("--bind", default="0.0.0.0", help="address to listen on (default: all)")
    server.add_argument("--port", type=_int_at_least(1), default=_DEFAULT_PROBE_PORT,
                        help=f"TCP port (default: {_DEFAULT_PROBE_PORT})")
    server.set_defaults(subparser=server)


def _probe_server(args: argparse.Namespace) -> int:
    from .linkprobe import serve

    print(f"lookahead-dist probe-server: listening on {args.bind}:{args.port}", flush=True)
    try:
        serve(args.bind, args.port)
    except OSError as exc:
        _error(f"probe-server: cannot listen on {args.bind}:{args.port} ({exc})")
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


_STEP_TIME_NOISE_S = 0.02


def _measure_step_time(command: str, counts: str) -> float:
    """Seconds per step of ``command``: run at two step counts, the difference of wall times over the
    difference of steps (start-up, imports and set-up are paid by both runs and cancel out)."""
    import subprocess
    import time

    if "{steps}" not in command:
        raise UsageError(f"--step-time-cmd must contain {{steps}} (where the step count goes), got {command!r}")
    try:
        a, b = (int(x) for x in counts.split(","))
    except ValueError:
        raise UsageError(f"--step-time-steps must be two integers A,B, got {counts!r}") from None
    if not 1 <= a < b:
        raise UsageError(f"--step-time-steps needs 1 <= A < B, got {counts!r}")
    seconds = []
    for n in (a, b):
        t0 = time.perf_counter()
        done = subprocess.run(command.replace("{steps}", str(n)), shell=True, capture_output=True, text=True)
        seconds.append(time.perf_counter() - t0)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise UsageError(f"--step-time-cmd exited {done.returncode} with {n} steps: {' | '.join(tail)}")
    extra = seconds[1] - seconds[0]
    # A command that ignores {steps} still shows a difference: the jitter of starting a process, a
    # few ms either way (more on a loaded machine). Only a difference clear of that noise measures
    # steps; the floor is 20 ms, or 5% of the shorter run for a command with a long start-up.
    noise = max(_STEP_TIME_NOISE_S, 0.05 * seconds[0])
    if extra <= noise:
        raise UsageError(f"--step-time-cmd: {b} steps took no longer than {a} beyond timing noise "
                         f"({seconds[1]:.3f} s vs {seconds[0]:.3f} s, noise floor {noise * 1e3:.0f} ms); "
                         f"does the command honour {{steps}}? If it does, set --step-time-steps further apart")
    return extra / (b - a)


def _split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        return text.strip("[]"), _DEFAULT_PROBE_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--probe: the port in {text!r} must be an integer in 1..65535")
    return host.strip("[]"), int(port)


def _count_model_file(path: str) -> int:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # missing file, not a torch file, pickled code
        raise UsageError(f"--model-file {path!r}: cannot read it as a torch-saved state dict ({exc})") from None
    total, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    if total < 1:
        raise UsageError(f"--model-file {path!r}: holds no tensors")
    return total


def _plan(args: argparse.Namespace) -> int:
    from . import plan as _p

    try:
        params = args.params if args.params is not None else _count_model_file(args.model_file)
        step_time = args.step_time
        if args.step_time_cmd is not None:
            step_time = _measure_step_time(args.step_time_cmd, args.step_time_steps)
            print(f"# step time {step_time * 1e3:.1f} ms, measured with --step-time-cmd",
                  file=sys.stderr if args.json else sys.stdout)
        workload = _p.Workload(params=params, step_time=step_time, ddp_overlap=args.ddp_overlap)
        bandwidth, latency = args.link, args.latency
        if args.probe is not None:
            from .linkprobe import probe

            host, port = _split_host_port(args.probe)
            try:
                measured = probe(host, port, nbytes=args.probe_bytes)
            except (OSError, ConnectionError) as exc:
                raise UsageError(f"--probe {args.probe}: {exc}") from None
            print(f"# {measured.describe()}", file=sys.stderr if args.json else sys.stdout)
            bandwidth = measured.bandwidth
            latency = measured.latency if latency is None else latency
        cluster = _p.Cluster(nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                             link=_p.Link(bandwidth, 1e-3 if latency is None else latency),
                             intra_link=_p.Link(args.intra_link, args.intra_latency))
    except ValueError as exc:
        args.subparser.error(str(exc))
    except UsageError as exc:
        args.subparser.error(str(exc))
    result = _p.plan(workload, cluster, k=args.k, target=args.target, max_delay=args.max_delay)
    if args.json:
        print(json.dumps([o.as_dict(recommended=o is result.recommended) for o in result.options], indent=2))
    else:
        print(_p.render(result, alpha=args.alpha))
    return 0


# -- turning arguments into run configs -----------------------------------------------------------
def _resolve_device(requested: str, nproc: int) -> str:
    import torch

    from .demo.launch import launched_externally

    if launched_externally():  # one GPU per rank *on this node*
        nproc = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cuda":
        if gpus < nproc:
            raise UsageError(f"--device cuda needs one GPU per rank: --nproc {nproc} but {gpus} GPU(s) visible")
        return "cuda"
    if requested == "auto":
        return "cuda" if gpus >= nproc else "cpu"
    return "cpu"


def _configs(args: argparse.Namespace, specs: Sequence[tuple[str, str]]) -> list[Any]:
    from .demo.config import RunConfig
    from .demo.launch import launched_externally
    from .demo.model import ModelConfig

    shape = QUICK if args.quick else DEFAULTS
    steps = args.steps if args.steps is not None else shape["steps"]
    batch = args.batch_size if args.batch_size is not None else shape["batch_size"]
    evals = args.eval_batches if args.eval_batches is not None else shape["eval_batches"]
    nproc = args.nproc
    if nproc is None:
        nproc = int(os.environ["WORLD_SIZE"]) if launched_externally() else 2
    device = _resolve_device(args.device, nproc)
    try:
        model = ModelConfig(seq_len=args.seq_len, n_layer=args.layers, d_model=args.d_model, n_head=args.heads)
    except ValueError as exc:
        raise UsageError(str(exc).replace("ModelConfig `d_model`", "--d-model").replace("`n_head`", "--heads")) from None
    if batch % nproc:
        raise UsageError(f"--batch-size {batch} is not divisible by --nproc {nproc}")
    _check_local_sgd_flags(args, specs)
    configs = []
    for mode, optimizer in specs:
        optimizer = optimizer or _default_optimizer(mode)  # `train` without --optimizer
        if mode == "local-sgd" and optimizer != "lookahead":
            raise UsageError(f"mode 'local-sgd' is Lookahead's local-SGD mode; it needs --optimizer lookahead, "
                             f"got {optimizer!r}")
        try:
            configs.append(RunConfig(mode=mode, optimizer=optimizer, k=args.k, alpha=args.alpha, lr=args.lr,
                                     weight_decay=args.weight_decay, grad_clip=args.grad_clip, steps=steps, batch_size=batch, nproc=nproc,
                                     seed=args.seed, eval_batches=evals, model=model, device=device,
                                     **_local_sgd_options(args, mode)))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return configs


# (flag, dest, default, modes that take it) of the local-SGD options, for the check that some run uses them.
_LOCAL_SGD_FLAGS = (("--outer-momentum", "outer_momentum", 0.0, STREAMING_MODES),
                    ("--nesterov", "nesterov", False, STREAMING_MODES),
                    ("--local-sgd-sharded", "sharded", False, ("local-sgd",)),
                    ("--comm-dtype", "comm_dtype", "fp32", WIRE_MODES),
                    ("--quant-block-size", "quant_block_size", 512, WIRE_MODES),
                    ("--error-feedback", "error_feedback", True, ("local-sgd",)),
                    ("--hierarchical", "hierarchical", False, ("local-sgd",)),
                    ("--num-fragments", "num_fragments", 1, STREAMING_MODES),
                    ("--fragment-sync-delay", "fragment_sync_delay", 0, STREAMING_MODES),
                    ("--fragment-update-alpha", "fragment_update_alpha", 0.0, STREAMING_MODES),
                    ("--eager-update", "eager_update", False, ("local-sgd",)),
                    ("--topk-fraction", "topk_fraction", None, WIRE_MODES),
                    ("--fused-kernels", "fused_kernels", False, ("local-sgd",)))


def _check_local_sgd_flags(args: argparse.Namespace, specs: Sequence[tuple[str, str]]) -> None:
    used = {mode for mode, _ in specs}
    for takers in dict.fromkeys(t for *_, t in _LOCAL_SGD_FLAGS):
        given = [flag for flag, dest, default, t in _LOCAL_SGD_FLAGS
                 if t == takers and getattr(args, dest) != default]
        if given and not used & set(takers):
            modes = ", ".join(dict.fromkeys(mode for mode, _ in specs))
            hint = (" (torchft's DiLoCo sends fp32 here: its quantisation is Triton-only)"
                    if "torchft-diloco" in used and "--comm-dtype" in given else "")
            raise UsageError(f"{', '.join(given)}: option(s) of --mode {' or '.join(takers)}, but no run uses it "
                             f"(mode: {modes}){hint}; drop them or use --mode {takers[0]}")


def _local_sgd_options(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    # Options of the local-sgd mode (the outer step and the fragment schedule also of torchft-diloco);
    # a `compare` mixing modes applies each to the runs that take it.
    if mode not in STREAMING_MODES:
        return {}
    opts: dict[str, Any] = dict(outer_momentum=args.outer_momentum, nesterov=args.nesterov,
                                num_fragments=args.num_fragments, fragment_sync_delay=args.fragment_sync_delay,
                                fragment_update_alpha=args.fragment_update_alpha)
    if mode == "local-sgd":
        opts.update(sharded=args.sharded, comm_dtype=args.comm_dtype, hierarchical=args.hierarchical,
                    quant_block_size=args.quant_block_size, error_feedback=args.error_feedback,
                    eager_update=args.eager_update, topk_fraction=args.topk_fraction,
                    fused_kernels=args.fused_kernels)
    elif mode == "traffic-only":
        opts.update(comm_dtype=args.comm_dtype, quant_block_size=args.quant_block_size,
                    topk_fraction=args.topk_fraction)
    return opts


# -- running --------------------------------------------------------------------------------------
def _is_rank0() -> bool:
    from .demo.launch import launched_externally

    return not launched_externally() or os.environ.get("RANK") == "0"


def _run(config: Any, progress: bool | None, label: str) -> dict[str, Any]:
    from .demo.launch import run_local
    from .demo.train import train_rank

    return run_local(train_rank, config.nproc, (config, progress, label), device=config.device)


def _skipped(config: Any, reason: str, status: str = "skipped") -> dict[str, Any]:
    return {"name": config.name, "config": config.as_dict(), "skipped": True, "status": status, "reason": reason}


def _emit(args: argparse.Namespace, results: list[dict[str, Any]], wall: float) -> None:
    from .demo.report import summary_table

    if not _is_rank0():
        return
    doc = {"command": args.command, "wall_seconds": wall, "runs": results}
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return
    print(summary_table(results))
    print(f"  total wall time: {wall:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
        print(f"  results written to {args.json}")


def _error(message: str, details: str = "", verbose: bool = False) -> None:
    print(f"lookahead-dist: error: {message}", file=sys.stderr)
    if details:
        print(details if verbose else "  (run with --verbose for the traceback)", file=sys.stderr)


def _execute(args: argparse.Namespace, configs: list[Any], *, keep_going: bool) -> int:
    from .demo.launch import RankFailure
    from .demo.modes import mode_unavailable_reason

    results: list[dict[str, Any]] = []
    status = 0
    start = time.perf_counter()
    for i, config in enumerate(configs):
        reason = mode_unavailable_reason(config.mode, config.optimizer)
        if reason is not None:
            if not keep_going:
                _error(reason)
                return 1
            results.append(_skipped(config, reason))
            continue
        label = config.name if len(configs) == 1 else f"[{i + 1}/{len(configs)}] {config.name}"
        try:
            results.append(_run(config, args.progress, label))
        except RankFailure as exc:
            _error(f"{config.name}: {exc}", exc.details, args.verbose)
            if not keep_going:
                return 1
            results.append(_skipped(config, f"failed: {exc}", status="failed"))
            status = 1
    _emit(args, results, time.perf_counter() - start)
    return status


def _missing_demo_modules() -> list[str]:
    import importlib.util

    return [name for name in DEMO_REQUIRES if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lookahead-dist`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # exits with status 2 on a bad command line
    if extra:  # reported with the subcommand's usage, which lists its options
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "plan":
        return _plan(args)
    if args.command == "probe-server":
        return _probe_server(args)
    try:
        if args.command == "train":
            configs = _configs(args, [(args.mode, args.optimizer or _default_optimizer(args.mode))])
        else:
            configs = _configs(args, args.runs or [_run_spec(s) for s in DEFAULT_RUNS])
    except UsageError as exc:
        args.subparser.error(str(exc))  # prints the command's usage and the message, exits 2
    missing = _missing_demo_modules()
    if missing:
        _error(f"`lookahead-dist {args.command}` needs {', '.join(missing)}, which the core install (torch "
               f"only) leaves out; install the demo extra: pip install 'lookahead-dist[{DEMO_EXTRA}]'")
        return 1
    try:
        return _execute(args, configs, keep_going=args.command == "compare")
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def entry() -> None:
    """The console script ``lookahead-dist`` and ``python -m lookahead_dist.cli``: :func:`main`,
    then the exit. A rank started by an external launcher (torchrun, the trainer's own processes
    are not) destroys its process group and leaves with
    :func:`lookahead_dist.distributed.exit_process`: with torch 2.13 a gloo rank can otherwise
    abort at interpreter finalization, after all its work and output are done, and torchrun then
    reports the run as failed (SIGABRT, docs/torchrun.md)."""
    from .demo.launch import launched_externally

    code = main()
    if not launched_externally():
        sys.exit(code)
    import torch.distributed as dist

    from .distributed import exit_process

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway; the run's result is already written
            pass
    exit_process(code or 0)


if __name__ == "__main__":
    entry()
