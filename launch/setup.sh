#!/usr/bin/env bash
# Idempotent set-up used by launch/demo.sh and launch/test.sh: a virtual environment in .venv with
# torch installed *first*, then this project with its [dev] extras. Needs only Python >= 3.10 and pip.
#
# Which torch build: a requirement that the venv already satisfies is kept as it is. Otherwise, on
# a machine without CUDA (no working `nvidia-smi`) torch comes from the CPU wheel index
# (https://download.pytorch.org/whl/cpu, a ~200 MB wheel instead of PyPI's multi-GB CUDA build),
# falling back to pip's own index when that index cannot be reached; on a machine with CUDA, from
# pip's own index (PyPI's Linux torch is the CUDA build).
#
#   LOOKAHEAD_PYTHON       interpreter used to create the venv (default: python3)
#   LOOKAHEAD_TORCH_SPEC   torch requirement installed first (default: torch==2.13.0)
#   LOOKAHEAD_TORCH_INDEX  index to take torch from instead of the choice above, e.g.
#                          https://download.pytorch.org/whl/cu126 (PyPI stays an extra index for
#                          torch's own dependencies); "pip" = pip's own configured index only
#   LOOKAHEAD_VENV         venv location (default: <repo>/.venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOOKAHEAD_VENV:-$ROOT/.venv}"
PY="${LOOKAHEAD_PYTHON:-python3}"
TORCH_SPEC="${LOOKAHEAD_TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${LOOKAHEAD_TORCH_INDEX:-}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
STAMP="$VENV/.lookahead-setup"
# Re-install when the project metadata or the torch choice changes.
WANT="$(sha1sum < "$ROOT/pyproject.toml" | cut -c1-16) $TORCH_SPEC $TORCH_INDEX"

# True when the venv's installed torch satisfies TORCH_SPEC (2.13.0+cpu satisfies ==2.13.0).
torch_satisfied() {
  "$VENV/bin/python" - "$TORCH_SPEC" 2>/dev/null <<'EOF'
import importlib.metadata as md
import sys

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
req = Requirement(sys.argv[1])
try:
    version = md.version(req.name)
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if req.specifier.contains(version, prereleases=True) else 1)
EOF
}

have_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install_torch() {
  local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  if torch_satisfied; then
    echo "[setup] $TORCH_SPEC already installed" >&2
  elif [ "$TORCH_INDEX" = "pip" ]; then
    echo "[setup] installing $TORCH_SPEC from pip's own index" >&2
    "${pip[@]}" "$TORCH_SPEC"
  elif [ -n "$TORCH_INDEX" ]; then
    echo "[setup] installing $TORCH_SPEC from $TORCH_INDEX" >&2
    "${pip[@]}" --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple "$TORCH_SPEC"
  elif have_cuda; then
    echo "[setup] CUDA found (nvidia-smi): installing $TORCH_SPEC from pip's own index (the CUDA build)" >&2
    "${pip[@]}" "$TORCH_SPEC"
  else
    echo "[setup] no CUDA (no working nvidia-smi): installing $TORCH_SPEC from the CPU wheel index" >&2
    if ! "${pip[@]}" --retries 2 --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple \
        "$TORCH_SPEC" 2>"$VENV/.torch-cpu-index.log"; then
      echo "[setup] the CPU wheel index failed (see $VENV/.torch-cpu-index.log); trying pip's own index" >&2
      "${pip[@]}" "$TORCH_SPEC"
    fi
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  install_torch
  echo "[setup] installing lookahead-dist with extras [dev]" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
  # timm's Lookahead is a benchmark peer. timm as an installed package needs torchvision (and
  # breaks the `accelerate` CLI, which imports it when present), so only its wheel is downloaded;
  # benchmarks/step_overhead.py loads the standalone optim/lookahead.py file from it.
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps timm \
    -d "$VENV/peers" || echo "[setup] could not download timm; that benchmark peer is skipped" >&2
  echo "$WANT" > "$STAMP"
fi
