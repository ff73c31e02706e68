#!/usr/bin/env bash
# The test suite: set up (first run only), then the unit and multi-process tests, then the MPI
# tests under mpiexec (pytest-mpi). DeepSpeed's C++ ops are built first (first run only). Extra arguments go to the first pytest run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="$ROOT/.venv/bin/python"
# DeepSpeed JIT-compiles its C++ optimizers on first use; build the ones the tests use now, once
# (cached in ~/.cache/torch_extensions: ~3-4 minutes in a new environment on 2 cores, ~3 s afterwards), so
# that a fresh machine runs every DeepSpeed case instead of skipping it.
"$PY" "$ROOT/launch/build_ds_ops.py"
"$PY" -m pytest tests -q -ra "$@"
if [ -d tests/mpi ] && ls tests/mpi/test_*.py >/dev/null 2>&1; then
  "$ROOT/.venv/bin/mpiexec" -n 2 "$PY" -m pytest --with-mpi tests/mpi -q -p no:cacheprovider
fi
