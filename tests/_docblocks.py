"""The fenced code blocks of README.md and docs/*.md, and how to check each as written.

Used by tests/unit/test_docs.py (single-process blocks, bash commands, links) and
tests/distributed/test_doc_blocks.py (blocks that need ranks). A block is named by its file and
its first non-empty line (plus ``#2``, ``#3`` when that line repeats in the file).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def first(self) -> str:
        return next(ln.strip() for ln in self.code.splitlines() if ln.strip())


def collect() -> dict[tuple[str, str], Block]:
    """Every fenced block, keyed by (file, first line[#n])."""
    out: dict[tuple[str, str], Block] = {}
    for path in DOC_FILES:
        rel = path.relative_to(ROOT).as_posix()
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^\s*```(\S*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            start, lang = i, m.group(1)
            i += 1
            body = []
            while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"{rel}:{start + 1}: code fence never closed")
            i += 1
            block = Block(rel, start + 1, lang, "\n".join(body) + "\n")
            key, n = (rel, block.first), 1
            while key in out:
                n += 1
                key = (rel, f"{block.first}#{n}")
            out[key] = block
    return out


# ---------------------------------------------------------------------------------------------
# Bash blocks: commands and what each one is run as.

WRAPPERS = {
    # launcher script -> what it hands its own arguments to
    "launch/demo.sh": ["-m", "lookahead_dist.cli", "compare"],
    "./launch/demo.sh": ["-m", "lookahead_dist.cli", "compare"],
    "launch/torchrun_single_node.sh": ["launch/train_example.py"],
    "launch/torchrun_multi_node.sh": ["launch/train_example.py"],
    "launch/mpiexec.sh": ["launch/train_example.py"],
    "launch/ft_local_sgd.sh": ["launch/ft_train.py"],
    "tools/netcluster.sh": ["tools/netcluster.py"],
}


def commands(block: Block) -> list[str]:
    """The shell commands of a bash block: continuations joined, comments and output dropped.

    In a block whose commands carry a ``$ `` prompt, the other lines are output."""
    raw = block.code.splitlines()
    prompted = any(ln.startswith("$ ") for ln in raw)
    cmds, cur = [], ""
    for ln in raw:
        if prompted and not cur and not ln.startswith("$ "):
            continue  # output
        ln = ln[2:] if prompted and not cur else ln
        ln = re.sub(r"(^|\s)#.*$", "", ln).rstrip()
        if ln.endswith("\\"):
            cur += ln[:-1] + " "
            continue
        cur += ln
        if cur.strip():
            cmds.append(cur.strip())
        cur = ""
    return cmds


def python_argv(cmd: str) -> tuple[list[str], list[str]] | None:
    """(python argv after the interpreter, notes) of the Python program a command ends up running,
    or None when it runs none. Launchers' own options are checked by their own parsers."""
    toks = shlex.split(cmd)
    while toks and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", toks[0]):
        toks.pop(0)
    if toks and toks[0] == "sudo":
        toks.pop(0)
    if not toks:
        return None
    exe = toks[0]
    if exe in WRAPPERS:
        return WRAPPERS[exe] + toks[1:], []
    if exe == "lookahead-dist":
        return ["-m", "lookahead_dist.cli", *toks[1:]], []
    if exe.endswith("python") or exe.endswith("python3"):
        return toks[1:], []
    if exe.endswith("torchrun"):
        return ["-m", "torch.distributed.run", *toks[1:]], []
    if exe == "accelerate" and toks[1:2] == ["launch"]:
        return ["-m", "accelerate.commands.launch", *toks[2:]], []
    if exe.endswith("mpiexec"):
        rest = toks[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:]
        return python_argv(shlex.join(rest))
    return None


# ---------------------------------------------------------------------------------------------
# Running Python blocks as written.


def block_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra or {})
    return env


_EPILOGUE = """

import torch.distributed as _dist
from lookahead_dist.distributed import exit_process as _exit_process
if _dist.is_initialized():
    _dist.destroy_process_group()
_exit_process(0)
"""


def run_python(code: str, cwd: Path, *, ranks: int = 0, nodes: int = 1, timeout: float = 180.0) -> list[str]:
    """Run ``code`` as ``python block.py`` in ``cwd``: once (ranks=0), or as ``ranks`` processes with
    the environment torchrun gives its workers (``nodes`` "nodes" of ranks/nodes workers). Returns
    each process's output; raises AssertionError with it on a non-zero exit."""
    from lookahead_dist.distributed import free_port

    script = cwd / "block.py"
    # A ranked block ends where the user's script would go on; the script's end is ours to write,
    # as docs/torchrun.md tells scripts to end: destroy the group, then leave without interpreter
    # finalization (gloo's teardown race: lookahead_dist.distributed.exit_process; seen in CI).
    script.write_text(code + (_EPILOGUE if ranks else ""))
    if ranks == 0:
        envs = [block_env()]
    else:
        port, per_node = free_port(), ranks // nodes
        envs = [block_env(dict(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(ranks),
            LOCAL_RANK=str(r % per_node), LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK=str(r // per_node),
            ROLE_RANK=str(r), ROLE_WORLD_SIZE=str(ranks), TORCHELASTIC_RUN_ID="doc-test"))
            for r in range(ranks)]
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for e in envs]
    outs, failed = [], []
    try:
        for r, p in enumerate(procs):
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
            if p.returncode != 0:
                failed.append(f"--- process {r}: exit {p.returncode} ---\n{out[-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        raise AssertionError("\n".join(failed))
    return outs


# ---------------------------------------------------------------------------------------------
# The decision for every block. A block without one fails tests/unit/test_docs.py.
#
# kind:
#   "run"      Python, run as written in one process (``python block.py`` in a temp dir)
#   "ranks"    Python, run as written under 2 processes with torchrun's environment (gloo)
#   "compile"  Python that cannot run here: compiled only; ``why`` says why and what runs it instead
#   "argv"     bash: every command's Python program parses its exact argv (not run); pip extras and
#              repo scripts that run no Python are checked to exist
#   "console"  ``$ command`` lines run for real; the output shown must be what they print
#   "json"     a JSON fragment that must parse and equal the shipped config's
#   "text"     not code (output, a diagram, a formula, a citation)
# after: the blocks (first lines, same file) whose code runs first in the same process, for a
#   block that continues an earlier one. A block that others continue is not run on its own.
# inproc: a "run" block of plain torch with no global state, exec'd in the test process.
# ops: DeepSpeed ops the run builds; skipped with a message when not built yet.

RUN, RANKS, COMPILE, ARGV, CONSOLE, JSON, TEXT = "run", "ranks", "compile", "argv", "console", "json", "text"

_LONG = "a long run (training, benchmark or whole test suite): its argv is parsed, not run"

DECISIONS: dict[tuple[str, str], dict] = {
    # README.md
    ("README.md", "import torch"): dict(kind=RUN, inproc=True),
    ("README.md", "./launch/demo.sh   # the main job: compare AdamW vs Lookahead(AdamW) and the distributed modes"):
        dict(kind=ARGV, why="demo: ~3 min on 2 cores; test.sh runs the whole suite"),
    ("README.md", "run                  k  alpha      train loss  val loss  samples/s  comm/step/rank  slow weights/rank  time"):
        dict(kind=TEXT, why="output of ./launch/demo.sh (2 min on the idle 2-core machine)"),
    ("README.md", "pip install -e .                 # the library: depends on torch only"):
        dict(kind=ARGV, why="installs into the environment: the extras named must exist"),
    ("README.md", "src/lookahead_dist/   lookahead.py (the optimizer: counting, state, step), _keys.py, _sync.py (foreach hot path),"):
        dict(kind=TEXT, why="the repository layout"),
    ("README.md", "@inproceedings{zhang2019lookahead,"): dict(kind=TEXT, why="citation"),
    # docs/accelerate.md
    ("docs/accelerate.md", "# plain data parallelism, 2 processes (CPU + gloo here, GPUs + NCCL where present)"):
        dict(kind=ARGV, why="launcher runs, ~30 s each; run by tests/distributed/test_launchers.py"),
    ("docs/accelerate.md", "import torch"): dict(kind=RUN),
    ("docs/accelerate.md", '"lookahead": {"k": 5, "alpha": 0.5, "local_sgd": false}'):
        dict(kind=JSON, config="launch/deepspeed/zero2.json"),
    ("docs/accelerate.md", "accelerate launch --config_file launch/accelerate/ddp.yaml launch/train_example.py --save-dir ckpt --save-at 6"):
        dict(kind=ARGV, why="launcher runs; run by tests/distributed/test_launchers.py"),
    ("docs/accelerate.md", "import torch#2"): dict(kind=RUN),
    ("docs/accelerate.md", "$ HF_HUB_OFFLINE=1 python launch/hf_trainer.py --output-dir out"):
        dict(kind=ARGV, why="four Trainer runs with transformers; the one-process one runs as the Python block above, "
                            "the rest in tests/distributed/test_hf_trainer.py"),
    ("docs/accelerate.md", "class LookaheadAdamW(Lookahead):"):
        dict(kind=COMPILE, why="the Trainer under DeepSpeed needs ranks and a minute; this class and call are "
                               "launch/hf_trainer.py's, run by tests/distributed/test_hf_trainer.py"),
    ("docs/accelerate.md", "from lookahead_dist.hf import LookaheadTrainer"):
        dict(kind=COMPILE, why="the Trainer under DeepSpeed needs ranks and a minute (model, dataset: the tiny GPT-2 "
                               "of launch/hf_trainer.py); LookaheadTrainer with this block is run by "
                               "tests/distributed/test_hf_trainer.py"),
    # docs/api.md
    ("docs/api.md", "from lookahead_dist import Lookahead, strip_lookahead_state"): dict(kind=RUN, inproc=True),
    # docs/benchmarks.md
    ("docs/benchmarks.md", "OMP_NUM_THREADS=1 python -m benchmarks.convergence --suite streaming --rate none --steps 320 --seeds 0,1 \\"):
        dict(kind=ARGV, why=_LONG),
    # docs/deepspeed.md
    ("docs/deepspeed.md", "# train_ds.py -- run with: deepspeed --num_gpus 2 train_ds.py   (or torchrun --nproc-per-node 2;"):
        dict(kind=RANKS, ops=["deepspeed_shm_comm"]),
    ("docs/deepspeed.md", "from lookahead_dist.deepspeed import initialize"):
        dict(kind=RANKS, after=["# train_ds.py -- run with: deepspeed --num_gpus 2 train_ds.py   (or torchrun --nproc-per-node 2;"],
             ops=["deepspeed_shm_comm", "fused_adam"]),
    ("docs/deepspeed.md", "import torch"):
        dict(kind=RANKS, after=["# train_ds.py -- run with: deepspeed --num_gpus 2 train_ds.py   (or torchrun --nproc-per-node 2;",
                                "from lookahead_dist.deepspeed import initialize"],
             ops=["deepspeed_shm_comm", "fused_adam"]),
    ("docs/deepspeed.md", "# train_nodes.py -- run on each node: torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 train_nodes.py"):
        dict(kind=RANKS, nodes=2, ops=["fused_adam"]),  # 2 "nodes" x 1 rank
    ("docs/deepspeed.md", "# checkpoints (continues train_nodes.py): node i saves to and loads from ckpt/node<i>/"):
        dict(kind=RANKS, nodes=2, ops=["fused_adam"],  # 2 "nodes" x 1 rank
             after=["# train_nodes.py -- run on each node: torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29500 train_nodes.py"]),
    ("docs/deepspeed.md", "python -m benchmarks.deepspeed_nodes --rates 1gbit,100mbit --reps 3 --steps 34 --write"):
        dict(kind=ARGV, why="needs root (network namespaces) and minutes: " + _LONG),
    ("docs/deepspeed.md", "# z3_padding.py -- run with: DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 z3_padding.py"):
        dict(kind=RANKS),
    ("docs/deepspeed.md", "rank 1 param of 21: partition 11, padding [3.76525534247764e-39]"):
        dict(kind=TEXT, why="output of the z3_padding.py block above (uninitialised memory: differs per run)"),
    ("docs/deepspeed.md", '# saved with engine.save_checkpoint("ckpt", tag="step100") on 4 ranks'):
        dict(kind=ARGV, why="needs a 4-rank ZeRO checkpoint; tests/distributed/test_deepspeed_universal.py converts one"),
    ("docs/deepspeed.md", "import lookahead_dist.deepspeed as la_ds"):
        dict(kind=COMPILE, why="loads the universal checkpoint of the command above (4 ranks saved, 2 load); "
                               "tests/distributed/test_deepspeed_universal.py runs this path"),
    # docs/design.md
    ("docs/design.md", "phi_0 = theta_0"): dict(kind=TEXT, why="the algorithm, as pseudo-code"),
    # docs/errors.md
    ("docs/errors.md", "python tests/unit/test_errors.py --write              # regenerate after changing a message"):
        dict(kind=ARGV, why="rewrites docs/errors.md / runs a test file"),
    # docs/fault-tolerance.md
    ("docs/fault-tolerance.md", "pip install -e '.[ft]'      # torchft >= 0.2 (the [test] extra pulls it too)"):
        dict(kind=ARGV, why="installs into the environment: the extra must exist"),
    ("docs/fault-tolerance.md", "from datetime import timedelta"):
        dict(kind=COMPILE, why="needs a torchft lighthouse and a store per replica group; launch/ft_train.py is the "
                               "runnable version, run by tests/distributed/test_ft.py"),
    ("docs/fault-tolerance.md", "launch/ft_local_sgd.sh                                   # 2 groups, 20 committed syncs"):
        dict(kind=ARGV, why="fault drills of 20-80 syncs; tests/distributed/test_ft.py runs a shorter one"),
    ("docs/fault-tolerance.md", "$ KILL_GROUP=1 KILL_AT=5 RESTART_AFTER=3 LIGHTHOUSE_PORT=29611 LOG_DIR=/tmp/ftdrill \\"):
        dict(kind=TEXT, why="a recorded drill (command and its output); the command's argv is the block above's"),
    ("docs/fault-tolerance.md", "$ OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distributed/test_ft.py -q -s"):
        dict(kind=TEXT, why="recorded output of a test file that CI runs anyway"),
    # docs/local-sgd.md
    ("docs/local-sgd.md", "every step, every rank:      theta_i <- inner_step(theta_i)             (no communication)"):
        dict(kind=TEXT, why="the update, as pseudo-code"),
    ("docs/local-sgd.md", "import torch, torch.distributed as dist"): dict(kind=RANKS),
    ("docs/local-sgd.md", "import torch, torch.distributed as dist#2"): dict(kind=RANKS),
    ("docs/local-sgd.md", "import os"):
        dict(kind=RANKS, nodes=2, after=["import torch, torch.distributed as dist#2"]),
    ("docs/local-sgd.md", 'opt = Lookahead(inner, k=16, alpha=0.5, local_sgd=LocalSGDOptions(   # inner, model: as in "API" above'):
        dict(kind=RANKS, after=["import torch, torch.distributed as dist"]),
    ("docs/local-sgd.md", '$ python -c "from lookahead_dist.sync.streaming import suggest_schedule as s; \\'):
        dict(kind=CONSOLE),
    ("docs/local-sgd.md", "$ lookahead-dist plan --params 6.3M --step-time 100ms --nodes 2 --link 200Mbit --k 16"):
        dict(kind=TEXT, why="a command and its output, with blank lines (which the console check drops); "
                            "tests/unit/test_plan.py runs the command and compares every line"),
    ("docs/local-sgd.md", "opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=3e-4), k=64, local_sgd=LocalSGDOptions("):
        dict(kind=RANKS, after=["import torch, torch.distributed as dist",
                                'opt = Lookahead(inner, k=16, alpha=0.5, local_sgd=LocalSGDOptions(   # inner, model: as in "API" above']),
    # docs/reliability.md
    ("docs/reliability.md", "from lookahead_dist.checkpointing import load_latest, save_checkpoint"):
        dict(kind=COMPILE, why="an outline (its build() and loop body are yours); launch/train_resumable.py is the "
                               "whole recipe, run under torchrun by tests/distributed/test_crash_resume.py"),
    ("docs/reliability.md", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 2 --max-restarts 3 \\"):
        dict(kind=ARGV, why="torchrun jobs with restarts; run by tests/distributed/test_crash_resume.py"),
    ("docs/reliability.md", 'ckpt/latest                   "step_00000010": the last complete checkpoint'):
        dict(kind=TEXT, why="a directory listing"),
    ("docs/reliability.md", "python -m benchmarks.crash_resume --repeats 3"): dict(kind=ARGV, why=_LONG),
    # docs/support-matrix.md
    ("docs/support-matrix.md",
     "python -m benchmarks.gpu_check --device cuda              # one PASS/FAIL line per case; exit 0 = all passed"):
        dict(kind=ARGV, why="needs a GPU; the same cases run on CPU in tests/unit/test_gpu_check.py"),
    # docs/torchrun.md
    ("docs/torchrun.md", "launch/torchrun_single_node.sh                      # 2 processes on this machine (DDP)"):
        dict(kind=ARGV, why="launcher runs (two machines for the multi-node lines); run by "
                            "tests/distributed/test_launchers.py"),
    ("docs/torchrun.md", "import torch"): dict(kind=RANKS),
    ("docs/torchrun.md", "launch/mpiexec.sh --local-sgd                           # = mpiexec -n 2 python launch/train_example.py --local-sgd"):
        dict(kind=ARGV, why="MPI launches (two machines for the second); run by tests/distributed/test_launchers.py"),
    ("docs/torchrun.md", "mpiexec -n 2 .venv/bin/python -m pytest --with-mpi tests/mpi"):
        dict(kind=ARGV, why="runs the MPI test directory (launch/test.sh does)"),
    ("docs/torchrun.md", "node i   netns lkdc-<pid>-<start>-n<i>     lo up, eth0 = 10.77.0.<i+1>/24, hostname node<i> resolves"):
        dict(kind=TEXT, why="the topology, as a diagram"),
    ("docs/torchrun.md", "# a torchrun job: placeholders are filled per node"):
        dict(kind=ARGV, why="needs root (network namespaces); tests/distributed/test_cluster.py runs the tool where it can"),
    ("docs/torchrun.md", "from tools.netcluster import Cluster, torchrun_prefix"):
        dict(kind=COMPILE, why="needs root (network namespaces) and a train.py of yours; "
                               "tests/distributed/test_cluster.py runs Cluster where it can"),
}


def chains(blocks: dict[tuple[str, str], Block]) -> dict[tuple[str, str], str]:
    """The code to run for each runnable block no other block continues: its `after` blocks first."""
    continued = {(f, a) for (f, _), d in DECISIONS.items() for a in d.get("after", [])}
    out = {}
    for key, d in DECISIONS.items():
        if d["kind"] in (RUN, RANKS) and key not in continued and key in blocks:
            parts = [blocks[(key[0], a)].code for a in d.get("after", [])] + [blocks[key].code]
            out[key] = "\n".join(parts)
    return out


def ensure_ops(names: list[str]) -> None:
    """Build the DeepSpeed ops among ``names`` that would otherwise compile on first use, once.

    ``launch/test.sh`` has already built them (``launch/build_ds_ops.py``); this covers a direct
    ``pytest`` run on a fresh machine, so a test never skips for an op the set-up can build."""
    if not names:
        return
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "build_ds_ops.py")
    subprocess.run([sys.executable, script, *names], check=True, timeout=1800)
