#!/usr/bin/env bash
# torchrun on one machine: NPROC_PER_NODE processes (default 2), DDP over gloo on CPU, NCCL on GPUs.
#   launch/torchrun_single_node.sh                        # launch/train_example.py, 2 processes
#   NPROC_PER_NODE=4 launch/torchrun_single_node.sh --local-sgd --k 8
#   SCRIPT=my_train.py launch/torchrun_single_node.sh --my-flag
# Environment: NPROC_PER_NODE (2), SCRIPT (launch/train_example.py), PYTHON (the repo's .venv if any).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 \
    --nproc-per-node "${NPROC_PER_NODE:-2}" "${SCRIPT:-$here/train_example.py}" "$@"
