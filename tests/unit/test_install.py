"""The lean install: the library needs torch only, ships py.typed, and names its extras."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lookahead_dist

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_core_dependencies_are_torch_only():
    deps = PYPROJECT["project"]["dependencies"]
    assert [d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps] == ["torch"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["demo"] == ["tqdm"]
    assert "numpy" in extras["test"]


def test_py_typed_ships():
    assert (Path(lookahead_dist.__file__).parent / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["lookahead_dist"]


def test_every_library_module_imports_without_numpy_or_tqdm():
    # Every module outside the demo, in a fresh interpreter where numpy and tqdm cannot be imported.
    names = sorted(m.name for m in pkgutil.walk_packages(lookahead_dist.__path__, "lookahead_dist.")
                   if not m.name.startswith("lookahead_dist.demo"))
    assert "lookahead_dist.cli" in names and "lookahead_dist.sync.local_sgd" in names
    code = ("import importlib, sys\n"
            "sys.modules['numpy'] = sys.modules['tqdm'] = None\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "from lookahead_dist import cli\n"
            "try:\n"
            "    cli.main(['--help'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "assert cli.main(['train', '--device', 'cpu']) == 1\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lookahead-dist[demo]" in proc.stderr
