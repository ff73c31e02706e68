"""``benchmarks/gpu_check.py`` runs its cases on gloo/CPU (``--device cpu``), so the script the first
GPU will run is exercised in CI; ``--device cuda`` without a GPU exits 77."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_cpu_run_passes_every_case():
    out = _run("--device", "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], out.stdout
    passes = [line for line in lines if line.startswith("PASS")]
    # anchor, flat parity, sharded parity, issue-16 formats (6 flat, 2 sharded eager), fused kernels, 5 modes x 2
    assert len(passes) == 1 + 8 + 2 + 6 + 2 + 1 + 10, out.stdout
    assert "PASS parity/sharded/eager-int2-top2pct/F2:" in out.stdout
    assert "PASS fused/flat/int4/F4tau1: fused vs eager kernels: bit for bit equal" in out.stdout
    assert "cases passed, 0 failed" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the exit-77 path does not apply")
def test_cuda_without_a_gpu_exits_77():
    out = _run("--device", "cuda")
    assert out.returncode == 77 and "no CUDA device" in out.stderr, (out.returncode, out.stderr)


def test_bad_steps_is_refused_naming_the_flag():
    out = _run("--device", "cpu", "--steps", "3")
    assert out.returncode == 2 and "--steps must be at least" in out.stderr, out.stderr
