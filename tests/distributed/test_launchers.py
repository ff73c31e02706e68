"""The real launchers, as subprocesses, against a single-process reference.

Each run trains launch/train_example.py (12 steps, Lookahead(AdamW) k=5, alpha=0.5) and prints the
checksum of its final weights; data-parallel runs must reproduce the one-process trajectory, local
SGD the W-replica simulation (tests/distributed/_example_ref.py), to 1e-6 relative (rounding of the
all-reduce; a wrong sync, alpha, k or a lost slow weight moves the checksum by > 1e-3).

accelerate is started as ``python -m accelerate.commands.launch``: the same launcher as the
``accelerate launch`` console command, without the command's eager import of every subcommand
(its ``estimate`` subcommand imports timm when installed, and timm needs torchvision).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lookahead_dist import SLOW_KEY, STEP_KEY

from . import _example_ref as ref
from ._spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "launch" / "train_example.py"
pytestmark = [pytest.mark.distributed]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(cmd: list[str], timeout: float = 150, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _accelerate(config: str | Path, *args: str) -> float:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), str(EXAMPLE), *args]
    return ref.parse_result(_run(cmd))


@pytest.mark.timeout(120)
def test_torchrun_two_nodes_on_one_machine(tmp_path):
    """launch/torchrun_multi_node.sh twice (NODE_RANK 0 and 1), meeting at a localhost c10d endpoint."""
    env = _env() | {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                    "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "RDZV_ID": f"test-{os.getpid()}"}
    script = str(ROOT / "launch" / "torchrun_multi_node.sh")
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]  # files, not pipes: neither node can block on output
    nodes = []
    try:
        for r, log in enumerate(logs):
            with open(log, "w") as f:
                nodes.append(subprocess.Popen([script], cwd=ROOT, env=env | {"NODE_RANK": str(r)}, stdout=f,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        try:
            codes = [n.wait(timeout=100) for n in nodes]
        except subprocess.TimeoutExpired:
            pytest.fail("the two torchrun nodes did not finish in 100 s:\n" + "\n".join(
                f"--- node {r} ---\n{log.read_text()[-3000:]}" for r, log in enumerate(logs)))
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, 9)  # the agent and its worker
    outs = [log.read_text() for log in logs]
    for code, out in zip(codes, outs):
        assert code == 0, out[-4000:]
    assert "world=2" in "".join(outs)
    assert ref.close(ref.parse_result("".join(outs)), ref.data_parallel())


@pytest.mark.timeout(120)
def test_accelerate_ddp_save_state_and_resume(tmp_path):
    """accelerate DDP on CPU (gloo): the uninterrupted run, and a fresh run resumed from save_state
    mid-cycle (step 6 of k=5: slow weights and counter must come back), both equal the reference."""
    config = ROOT / "launch" / "accelerate" / "ddp.yaml"
    state = tmp_path / "state"
    want = ref.data_parallel()
    assert ref.close(_accelerate(config, "--save-dir", str(state), "--save-at", "6"), want)
    saved = torch.load(state / "optimizer.bin", weights_only=False)
    entries = list(saved["state"].values())
    assert entries and all(SLOW_KEY in e for e in entries) and entries[0][STEP_KEY] == 1
    assert ref.close(_accelerate(config, "--resume", str(state), "--save-at", "6"), want)


@pytest.mark.timeout(90)
def test_accelerate_ddp_local_sgd():
    """Local SGD under accelerate's DDP: prepare() stops the per-step gradient all-reduce."""
    got = _accelerate(ROOT / "launch" / "accelerate" / "ddp.yaml", "--local-sgd")
    assert ref.close(got, ref.local_sgd(2))
    assert not ref.close(got, ref.data_parallel(), rel=1e-3)  # it really trained apart


def _deepspeed_config(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of launch/accelerate/deepspeed.yaml pointing at launch/deepspeed/zero2.json with ``changes``."""
    pytest.importorskip("deepspeed")
    # accelerate's DeepSpeed plugin compares the transformers version whenever it is selected.
    pytest.importorskip("transformers", reason="accelerate's DeepSpeed plugin needs transformers installed")
    ds = json.loads((ROOT / "launch" / "deepspeed" / "zero2.json").read_text())
    ds.update(changes)
    (tmp_path / f"{name}.json").write_text(json.dumps(ds))
    yaml = (ROOT / "launch" / "accelerate" / "deepspeed.yaml").read_text()
    assert "launch/deepspeed/zero2.json" in yaml
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.replace("launch/deepspeed/zero2.json", str(tmp_path / f"{name}.json")))
    return path


@pytest.mark.timeout(150)
def test_accelerate_deepspeed_zero2_lookahead_block(tmp_path):
    """The shipped DeepSpeed plugin config (ZeRO-2, "lookahead" block wraps the plain AdamW):
    an uninterrupted run and a fresh run resumed from save_state both equal the reference."""
    _deepspeed_config(tmp_path, "unused")  # the skips
    config = ROOT / "launch" / "accelerate" / "deepspeed.yaml"
    block = json.loads((ROOT / "launch" / "deepspeed" / "zero2.json").read_text())["lookahead"]
    want = ref.data_parallel(k=block["k"], alpha=block["alpha"])
    state = tmp_path / "state"
    assert ref.close(_accelerate(config, "--save-dir", str(state), "--save-at", "6"), want)
    assert ref.close(_accelerate(config, "--resume", str(state), "--save-at", "6"), want)


@pytest.mark.timeout(90)
def test_accelerate_deepspeed_offload_keeps_lookahead(tmp_path):
    """Optimizer offload with zero_force_ds_cpu_optimizer unset: accelerate alone would swap in
    DeepSpeedCPUAdam; prepare() keeps the Lookahead and the trajectory is the reference's."""
    config = _deepspeed_config(tmp_path, "offload",
                               zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    assert ref.close(_accelerate(config), ref.data_parallel())


@pytest.mark.timeout(90)
def test_accelerate_deepspeed_local_sgd(tmp_path):
    """Local SGD under the DeepSpeed plugin (where accelerate's own LocalSGD raises): ZeRO stage 0,
    the engine's gradient all-reduce off, the Lookahead sync the only communication."""
    config = _deepspeed_config(tmp_path, "local", zero_optimization={"stage": 0},
                               lookahead={"k": 5, "alpha": 0.5, "local_sgd": True})
    assert ref.close(_accelerate(config), ref.local_sgd(2))


@pytest.mark.timeout(90)
def test_mpiexec_script_local_sgd():
    """launch/mpiexec.sh in local-SGD mode: ranks from MPI's environment, rendezvous through mpi4py.
    (torchrun_single_node.sh is the multi-node script's command with --standalone; its syntax is checked.)"""
    pytest.importorskip("mpi4py")
    env = _env() | {"PYTHON": sys.executable, "NP": "2"}
    out = _run([str(ROOT / "launch" / "mpiexec.sh"), "--steps", "7", "--local-sgd", "--k", "3"], env=env)
    assert "world=2" in out and ref.close(ref.parse_result(out), ref.local_sgd(2, steps=7, k=3))
    _run(["bash", "-n", str(ROOT / "launch" / "torchrun_single_node.sh")])
