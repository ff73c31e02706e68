#!/usr/bin/env bash
# Idempotent set-up used by launch/demo.sh and launch/test.sh: a virtual environment in .venv with
# the CPU torch wheel installed *first* (a bare `torch` requirement would pull a multi-GB CUDA
# build), then this project with its extras. Needs only Python >= 3.10 and pip.
#   LOOKAHEAD_PYTHON      interpreter used to create the venv (default: python3)
#   LOOKAHEAD_TORCH_SPEC  torch requirement installed first (default: torch==2.13.0; on a GPU
#                         machine set it to the CUDA build you want)
#   LOOKAHEAD_VENV        venv location (default: <repo>/.venv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOOKAHEAD_VENV:-$ROOT/.venv}"
PY="${LOOKAHEAD_PYTHON:-python3}"
TORCH_SPEC="${LOOKAHEAD_TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.lookahead-setup"
# Re-install when the project metadata changes.
WANT="$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-16) $TORCH_SPEC"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  echo "[setup] installing $TORCH_SPEC" >&2
  "${PIP[@]}" "$TORCH_SPEC"
  echo "[setup] installing lookahead-dist with extras [dev]" >&2
  "${PIP[@]}" -e "$ROOT[dev]"
  # timm's Lookahead is a benchmark peer. timm as an installed package needs torchvision (and
  # breaks the `accelerate` CLI, which imports it when present), so only its wheel is downloaded;
  # benchmarks/step_overhead.py loads the standalone optim/lookahead.py file from it.
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps timm \
    -d "$VENV/peers" || echo "[setup] could not download timm; that benchmark peer is skipped" >&2
  echo "$WANT" > "$STAMP"
fi
