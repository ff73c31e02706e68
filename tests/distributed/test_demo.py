"""The real ``lookahead-dist`` command, as a subprocess spawning 2 gloo ranks: every mode.

Checks what the summary promises: the loss goes down, the runs follow the same data (DDP and FSDP2
give the same losses: with 2 ranks every gradient sum is a single exact addition; ZeRO-2 the same
up to reduction order, which also checks that the demo's DeepSpeed config matches the other modes,
e.g. gradient clipping, where DeepSpeed's default differs), the bytes
counted at the dispatcher match the algorithms (DDP all-reduces every gradient once per step,
local SGD the weights once per k steps), and slow weights are sharded 1/N under FSDP2.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed

STEPS, K = 30, 5
SHAPE = ["--steps", str(STEPS), "--batch-size", "8", "--eval-batches", "2", "--k", str(K),
         "--device", "cpu", "--nproc", "2", "--no-progress"]


def _command() -> list[str]:
    exe = shutil.which("lookahead-dist", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "lookahead_dist.cli"]


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_command() + args, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.mark.timeout(300)
def test_train_and_compare_via_the_cli(tmp_path):
    # `train`, JSON on stdout.
    ddp = json.loads(_run(["train", "--mode", "ddp", *SHAPE, "--json"], tmp_path).stdout)["runs"][0]
    # `compare`, table on stdout and JSON to a file.
    out = tmp_path / "compare.json"
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    runs = "fsdp2:lookahead,local-sgd:lookahead" + (",zero2:lookahead" if has_deepspeed else "")
    proc = _run(["compare", "--runs", runs, *SHAPE, "--json", str(out)], tmp_path)
    assert "fsdp2/lookahead" in proc.stdout and "local-sgd/lookahead" in proc.stdout
    assert "slow weights/rank" in proc.stdout
    fsdp2, local, *zero2 = json.loads(out.read_text())["runs"]

    for r in (ddp, fsdp2, local):
        assert r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["config"]["steps"] == STEPS
        assert r["train_loss"] < r["train_loss_start"] - 0.5, r["name"]
        assert r["val_loss"] < math.log(256) - 1.0, r["name"]
        assert r["samples_per_s"] > 0

    param_bytes = ddp["param_bytes"]
    # DDP: one ring all-reduce of all gradients per step, 2 (N-1)/N * P = P bytes sent per rank.
    # Besides: DDP's one-off broadcast of its rebuilt bucket order on the first step (a few bytes).
    assert ddp["comm_bytes_by_op"]["all_reduce"] == pytest.approx(param_bytes)
    assert set(ddp["comm_bytes_by_op"]) <= {"all_reduce", "broadcast"}
    assert ddp["comm_bytes_by_op"].get("broadcast", 0) * STEPS < 1024
    assert ddp["comm_bytes_per_step"] == pytest.approx(param_bytes, rel=1e-4)
    assert ddp["slow_bytes_per_rank"] == [param_bytes, param_bytes]

    # FSDP2: same trajectory as DDP; slow weights are the rank's DTensor shard.
    assert [c[1] for c in fsdp2["loss_curve"]] == pytest.approx([c[1] for c in ddp["loss_curve"]], abs=2e-3)
    assert fsdp2["val_loss"] == pytest.approx(ddp["val_loss"], abs=2e-3)
    assert sum(fsdp2["slow_bytes_per_rank"]) == pytest.approx(param_bytes, rel=0.01)
    assert max(fsdp2["slow_bytes_per_rank"]) <= param_bytes / 2 * 1.01
    assert {"all_gather", "reduce_scatter"} <= set(fsdp2["comm_bytes_by_op"])

    # ZeRO-2: the same trajectory up to reduction order; slow weights in the rank's flat partition.
    for z in zero2:
        assert [c[1] for c in z["loss_curve"]] == pytest.approx([c[1] for c in ddp["loss_curve"]], abs=2e-2)
        assert z["val_loss"] == pytest.approx(ddp["val_loss"], abs=1e-2)
        assert max(z["slow_bytes_per_rank"]) <= param_bytes / 2 * 1.01

    # Local SGD: no gradient all-reduce, one weight average per k steps.
    assert local["comm_bytes_per_step"] == pytest.approx(param_bytes / K, rel=0.02)
    assert local["comm_bytes_per_step"] < ddp["comm_bytes_per_step"] / 2


@pytest.mark.timeout(300)
def test_bytes_counted_on_other_threads(tmp_path, monkeypatch):
    # The quantised reduce runs on a worker thread of lookahead_dist._quant and torchft's manager
    # all-reduces on threads of its own: the counter sees both, once each, with no side channel.
    small = ["--steps", "16", "--k", "4", "--quick", "--nproc", "2", "--no-progress", "--json"]
    fp32 = json.loads(_run(["train", "--mode", "local-sgd", *small], tmp_path).stdout)["runs"][0]
    int8 = json.loads(_run(["train", "--mode", "local-sgd", "--comm-dtype", "int8", *small], tmp_path).stdout)["runs"][0]
    P = fp32["params"] * 4  # fp32 bytes of the model
    assert fp32["comm_bytes_by_op"] == {"all_reduce": pytest.approx(P / 4)}  # a ring all-reduce per 4 steps, N=2
    # int8: an all-to-all then an all-gather of the codes (1 byte per value) and the fp32 scales
    # (1 per 512 values) of each half, padding to whole blocks included.
    assert set(int8["comm_bytes_by_op"]) == {"all_to_all", "all_gather"}
    per_stage = fp32["params"] * (1 + 4 / 512) / 2 / 4
    for op in ("all_to_all", "all_gather"):
        assert int8["comm_bytes_by_op"][op] == pytest.approx(per_stage, rel=0.01)
    if importlib.util.find_spec("torchft") is None:
        return
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=10_000, quorum_tick_ms=20)
    try:
        monkeypatch.setenv("TORCHFT_LIGHTHOUSE", lighthouse.address())
        ft = json.loads(_run(["train", "--mode", "torchft-diloco", *small], tmp_path).stdout)["runs"][0]
    finally:
        lighthouse.shutdown()
    assert ft["comm_bytes_by_op"] == {"all_reduce": pytest.approx(P / 4)}


@pytest.mark.timeout(300)
def test_traffic_only_puts_local_sgds_bytes_on_the_wire(tmp_path):
    # The streaming benchmark's control row: the same bytes per step as the local-SGD row it stands
    # beside (int8 streaming F=2 tau=1, and top-2% int2), with Lookahead never syncing.
    small = ["--steps", "16", "--k", "8", "--quick", "--nproc", "2", "--no-progress", "--json"]
    for wire in (["--num-fragments", "2", "--fragment-sync-delay", "1", "--comm-dtype", "int8"],
                 ["--comm-dtype", "int2", "--topk-fraction", "0.02"]):
        real = json.loads(_run(["train", "--mode", "local-sgd", *wire, *small], tmp_path).stdout)["runs"][0]
        ctrl = json.loads(_run(["train", "--mode", "traffic-only", *wire, *small], tmp_path).stdout)["runs"][0]
        assert ctrl["comm_bytes_per_step"] == pytest.approx(real["comm_bytes_per_step"], rel=0.01), wire
        assert set(ctrl["comm_bytes_by_op"]) == {"all_reduce"}
