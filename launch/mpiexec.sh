#!/usr/bin/env bash
# mpiexec (MPICH/Hydra from `pip install mpich`, or Open MPI): NP ranks of launch/train_example.py.
# The script's init_distributed() reads the rank from MPI's environment and agrees on
# MASTER_ADDR/MASTER_PORT through mpi4py; torch.distributed then runs over gloo (CPU) or NCCL.
#   launch/mpiexec.sh                      # 2 ranks on this machine
#   NP=4 launch/mpiexec.sh --local-sgd
#   MPIEXEC_ARGS="-hosts node0,node1" NP=2 launch/mpiexec.sh      # two machines (MPICH syntax)
# Environment: NP (2), MPIEXEC (the repo's .venv/bin/mpiexec if any), MPIEXEC_ARGS, SCRIPT, PYTHON.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
MPIEXEC="${MPIEXEC:-$here/../.venv/bin/mpiexec}"
[ -x "$MPIEXEC" ] || MPIEXEC="$(command -v mpiexec)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# shellcheck disable=SC2086  # MPIEXEC_ARGS is a list of words on purpose
exec "$MPIEXEC" -n "${NP:-2}" ${MPIEXEC_ARGS:-} "$PYTHON" "${SCRIPT:-$here/train_example.py}" "$@"
