#!/usr/bin/env bash
# torchrun across machines: run this once on every node, with the same NNODES and MASTER_ADDR.
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh --local-sgd
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun_multi_node.sh --local-sgd
# Environment (defaults): NNODES (2), NODE_RANK (0), NPROC_PER_NODE (1), MASTER_ADDR (127.0.0.1,
# the rendezvous host: any node reachable by all, usually node 0), MASTER_PORT (29500),
# RDZV_BACKEND (c10d: the agents meet at MASTER_ADDR:MASTER_PORT and the store lives in the agent
# on that host; "static" fixes the global ranks by NODE_RANK instead), RDZV_ID (a job id shared by
# the nodes), SCRIPT (launch/train_example.py), PYTHON (the repo's .venv if any).
# On a multi-homed host point gloo/NCCL at the right interface: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
rank_args=()  # c10d hands out node ranks in arrival order; static takes NODE_RANK as given
[ "$RDZV_BACKEND" = static ] && rank_args=(--node-rank "$NODE_RANK")
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" "${rank_args[@]}" --nproc-per-node "${NPROC_PER_NODE:-1}" \
    --rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "${RDZV_ID:-lookahead-example}" --max-restarts 0 \
    "${SCRIPT:-$here/train_example.py}" "$@"
