#!/usr/bin/env bash
# Fault-tolerant local SGD on one machine: a torchft lighthouse and NUM_REPLICA_GROUPS replica
# groups, each one launch/ft_train.py process (Lookahead(AdamW) with LocalSGDOptions(manager=...)).
#   launch/ft_local_sgd.sh                                      # 2 groups, 20 committed syncs
#   NUM_REPLICA_GROUPS=3 launch/ft_local_sgd.sh --syncs 50 --batch 18 --step-sleep 0.05
#   KILL_GROUP=1 KILL_AT=5 RESTART_AFTER=3 launch/ft_local_sgd.sh --syncs 60 --step-sleep 0.05
#       # fault drill: kill -9 group 1 once group 0 has committed 5 syncs, start it again 3 s later
# Environment: NUM_REPLICA_GROUPS (2), LIGHTHOUSE_PORT (29510), HEARTBEAT_MS (5000: how long the
# lighthouse waits before it drops a silent group), JOIN_TIMEOUT_MS (10000), LOG_DIR (a new temporary
# directory), KILL_GROUP / KILL_AT / RESTART_AFTER (the drill; unset: none), PYTHON (the repo's
# .venv if any). Other arguments go to every launch/ft_train.py. At the end the run's timeline
# (startups, kill, the survivors' stall, heal, final checksums) is printed from the event logs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
LIGHTHOUSE_BIN="$(dirname "$PYTHON")/torchft_lighthouse"
[ -x "$LIGHTHOUSE_BIN" ] || LIGHTHOUSE_BIN="$(command -v torchft_lighthouse || true)"
if [ -z "$LIGHTHOUSE_BIN" ]; then
  echo "torchft_lighthouse not found: install the [ft] extra (pip install -e '.[ft]')" >&2
  exit 2
fi
GROUPS_N="${NUM_REPLICA_GROUPS:-2}"
PORT="${LIGHTHOUSE_PORT:-29510}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t ft_local_sgd.XXXXXX)}"
mkdir -p "$LOG_DIR"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
export TORCHFT_LIGHTHOUSE="http://localhost:$PORT"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$LIGHTHOUSE_BIN" --min_replicas 1 --quorum_tick_ms 100 --bind "[::]:$PORT" \
    --heartbeat_timeout_ms "${HEARTBEAT_MS:-5000}" --join_timeout_ms "${JOIN_TIMEOUT_MS:-10000}" \
    >"$LOG_DIR/lighthouse.log" 2>&1 &
lighthouse=$!
pids+=("$lighthouse")
for _ in $(seq 100); do  # until it listens
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  kill -0 "$lighthouse" 2>/dev/null || { cat "$LOG_DIR/lighthouse.log" >&2; exit 1; }
  sleep 0.1
done

start_group() {  # $1: replica group id
  "$PYTHON" "$here/ft_train.py" --replica "$1" --groups "$GROUPS_N" --lighthouse "$TORCHFT_LIGHTHOUSE" \
      --log "$LOG_DIR/events_r$1.jsonl" "${@:2}" >>"$LOG_DIR/group_r$1.log" 2>&1 &
  group_pid[$1]=$!
  pids+=("$!")
}
declare -a group_pid
for r in $(seq 0 $((GROUPS_N - 1))); do start_group "$r" "$@"; done
echo "[ft] lighthouse on :$PORT, $GROUPS_N replica groups; logs in $LOG_DIR" >&2

if [ -n "${KILL_GROUP:-}" ]; then
  watch=0; [ "$KILL_GROUP" = 0 ] && watch=1  # count the syncs of a group that is not killed
  until grep -qE "\"event\": \"sync\", \"replica\": $watch, \"pid\": [0-9]+, \"step\": ${KILL_AT:-5}," \
      "$LOG_DIR/events_r$watch.jsonl" 2>/dev/null; do
    kill -0 "${group_pid[$watch]}" 2>/dev/null || { echo "[ft] group $watch exited before sync $KILL_AT; see $LOG_DIR" >&2; exit 1; }
    sleep 0.05
  done
  kill -9 "${group_pid[$KILL_GROUP]}" && echo "[ft] kill -9 group $KILL_GROUP ($(date +%T.%N | cut -c1-12))" >&2
  sleep "${RESTART_AFTER:-3}"
  start_group "$KILL_GROUP" "$@"
  echo "[ft] restarted group $KILL_GROUP ($(date +%T.%N | cut -c1-12))" >&2
fi

status=0
for r in $(seq 0 $((GROUPS_N - 1))); do wait "${group_pid[$r]}" || status=$?; done
"$PYTHON" "$here/ft_train.py" --summarize "$LOG_DIR"/events_r*.jsonl
exit "$status"
