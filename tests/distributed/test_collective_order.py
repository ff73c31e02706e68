"""The collective-order check of benchmarks/workers/collective_order.py (issue 14): FSDP2 inside each
replica, int8 streaming local SGD across replicas, the user's loss all-reduce every step, and the
flight recorder's dump of every rank compared. On CPU it runs on gloo, 4 ranks; benchmarks/gpu.sh
runs the same worker on NCCL, where the interleave check is strict. The checker itself is fed
hand-made dumps so that each check is seen to fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workers.collective_order import check

from ._spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "benchmarks" / "workers" / "collective_order.py"


def _entry(rid: int, group: str, op: str, size: int) -> dict:
    return {"record_id": rid, "process_group": (group, ""), "profiling_name": f"gloo:{op}",
            "input_sizes": [[size]], "input_dtypes": ["Float"], "is_p2p": False}


def _dump(*ops: tuple[str, str, int]) -> dict:
    return {"entries": [_entry(i, g, op, n) for i, (g, op, n) in enumerate(ops)]}


def test_checker_passes_identical_orders():
    d = _dump(("0", "all_reduce", 4), ("1", "all_to_all", 8), ("0", "all_reduce", 4))
    results = {name: ok for name, ok, _ in check({0: d, 1: d}, strict_interleave=True)}
    assert results == {"sequence": True, "interleave": True}


def test_checker_fails_a_different_sequence_in_one_group():
    a = _dump(("0", "all_reduce", 4), ("1", "all_to_all", 8))
    b = _dump(("0", "all_reduce", 4), ("1", "all_gather", 8))
    (name, ok, detail), _ = check({0: a, 1: b}, strict_interleave=False)
    assert name == "sequence" and not ok and "group 1" in detail and "#0" in detail, detail


def test_checker_fails_a_different_interleave_only_when_strict():
    a = _dump(("0", "all_reduce", 4), ("1", "all_to_all", 8))
    b = _dump(("1", "all_to_all", 8), ("0", "all_reduce", 4))
    (_, seq_ok, _), (_, lax_ok, lax) = check({0: a, 1: b}, strict_interleave=False)
    (_, _, _), (_, strict_ok, _) = check({0: a, 1: b}, strict_interleave=True)
    assert seq_ok and lax_ok and "reported" in lax and not strict_ok


@pytest.mark.distributed
def test_fsdp2_replicas_with_int8_streaming_issue_collectives_in_order(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), "--backend", "gloo",
           "--steps", "24", "--out", str(tmp_path / "fr")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0] for line in lines] == ["PASS sequence", "PASS interleave", "PASS replicas"], out[-4000:]
    assert "3 passed, 0 failed" in out
