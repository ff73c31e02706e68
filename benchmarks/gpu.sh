#!/usr/bin/env bash
# The throughput/bytes rows and the convergence runs on a GPU machine (NCCL), a few minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # default OUT_DIR: gpu-results
#
# One node, one rank per visible GPU (torchrun --nproc-per-node $NGPU, NCCL). Every row is
# `lookahead-dist train` with --device cuda and a 22M-parameter model (the CPU table's), then a
# larger 85M one; results as JSON per row plus table.md. bf16: the local-SGD rows include
# --comm-dtype bf16 (bf16 on the wire); the trainer's compute stays fp32 (TF32 matmuls where
# the GPU has them). With a single GPU only the 1-rank rows run (no communication to measure).
# The host and GPU are recorded in OUT_DIR/machine.txt (nvidia-smi). Run benchmarks/gpu_check.py
# first (docs/support-matrix.md). With >= 4 GPUs the hierarchical rows run as two "nodes" on this
# host (two torchrun agents, each with half the GPUs: DDP inside a node over NVLink/PCIe, local SGD
# across). With >= 2 GPUs (an even number) the collective-order check runs last: FSDP2 inside
# each replica + int8 streaming across replicas, every rank's flight recorder compared
# (benchmarks/workers/collective_order.py; strict on NCCL), output in OUT/collective-order.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "gpu.sh: no CUDA GPU visible" >&2; exit 77; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"; nproc; } > "$OUT/machine.txt"
LD=$(dirname "$($PY -c 'import sys; print(sys.executable)')")/lookahead-dist
[ -x "$LD" ] || LD=lookahead-dist
STEPS=${STEPS:-64}
PER_RANK=${PER_RANK:-8}
run() {  # name nproc model-flags row-flags...
  local name=$1 n=$2 model=$3; shift 3
  $PY -m torch.distributed.run --standalone --nproc-per-node "$n" --no-python "$LD" train "$@" $model \
    --steps "$STEPS" --batch-size $((PER_RANK * n)) --eval-batches 2 --device cuda --no-progress \
    --json "$OUT/$name-$n.json" || echo "{\"failed\": \"$name-$n\"}" > "$OUT/$name-$n.failed"
}
run_hier() {  # name model row-flags...: 2 nodes x NGPU/2 ranks on this host
  local name=$1 model=$2; shift 2
  local per=$((NGPU / 2)) port=$((29500 + RANDOM % 2000)) pids=() node
  for node in 0 1; do
    local json=() ; [ "$node" -eq 0 ] && json=(--json "$OUT/$name-$NGPU.json")
    CUDA_VISIBLE_DEVICES=$(seq -s, $((node * per)) $((node * per + per - 1))) \
      $PY -m torch.distributed.run --nnodes 2 --node-rank "$node" --nproc-per-node "$per" \
      --master-addr 127.0.0.1 --master-port "$port" --no-python "$LD" train "$@" $model \
      --steps "$STEPS" --batch-size $((PER_RANK * NGPU)) --eval-batches 2 --device cuda --no-progress "${json[@]}" &
    pids+=($!)
  done
  local ok=0; for pid in "${pids[@]}"; do wait "$pid" || ok=1; done
  [ "$ok" -eq 0 ] || echo "{\"failed\": \"$name-$NGPU\"}" > "$OUT/$name-$NGPU.failed"
}
for model in "--layers 7 --d-model 512 --heads 8 --seq-len 128" "--layers 12 --d-model 768 --heads 12 --seq-len 128"; do
  tag=$(echo "$model" | awk '{print "L"$2"d"$4}')
  for n in 1 $([ "$NGPU" -ge 2 ] && echo 2) $([ "$NGPU" -ge 4 ] && echo 4) $([ "$NGPU" -ge 8 ] && echo 8); do
    run "$tag-ddp" "$n" "$model" --mode ddp --no-lookahead
    run "$tag-ddp-la" "$n" "$model" --mode ddp
    [ "$n" -gt 1 ] || continue
    run "$tag-zero2" "$n" "$model" --mode zero2 --no-lookahead
    run "$tag-zero2-la" "$n" "$model" --mode zero2
    run "$tag-fsdp2" "$n" "$model" --mode fsdp2 --no-lookahead
    run "$tag-fsdp2-la" "$n" "$model" --mode fsdp2
    for k in 4 16 64; do run "$tag-local$k" "$n" "$model" --mode local-sgd --k $k; done
    run "$tag-local16-sharded" "$n" "$model" --mode local-sgd --k 16 --local-sgd-sharded
    run "$tag-local16-bf16" "$n" "$model" --mode local-sgd --k 16 --comm-dtype bf16
    # Streaming (F=4, tau=1) on each wire format, and blocking int8/int4: the NCCL paths of the
    # quantised reduce (caller-thread side stream) and of the fragment group.
    for wire in fp32 int8 int4; do
      run "$tag-stream16-F4-$wire" "$n" "$model" --mode local-sgd --k 16 --num-fragments 4 --fragment-sync-delay 1 \
        --comm-dtype "$wire"
    done
    run "$tag-local16-int8" "$n" "$model" --mode local-sgd --k 16 --comm-dtype int8
    run "$tag-local16-int4" "$n" "$model" --mode local-sgd --k 16 --comm-dtype int4
    run "$tag-ceiling" "$n" "$model" --mode local-sgd --k 1000000
    run "$tag-torch-plsgd" "$n" "$model" --mode post-local-sgd --k 16
    run "$tag-accel-lsgd" "$n" "$model" --mode accelerate-local-sgd --k 16
  done
  if [ "$NGPU" -ge 4 ] && [ $((NGPU % 2)) -eq 0 ]; then
    run_hier "$tag-hier16" "$model" --mode local-sgd --k 16 --hierarchical
    run_hier "$tag-hier16-stream-F4-int8" "$model" --mode local-sgd --k 16 --hierarchical \
      --num-fragments 4 --fragment-sync-delay 1 --comm-dtype int8
  fi
done
if [ "$NGPU" -ge 2 ] && [ $((NGPU % 2)) -eq 0 ]; then
  $PY -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/workers/collective_order.py \
    --backend nccl --out "$OUT/flight-recorder" 2>&1 | tee "$OUT/collective-order.txt" || true
fi
$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| job | ranks | samples/s | counted MB/step/rank | slow weights/rank (MB) | final loss |", "|---|---|---|---|---|---|"]
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())["runs"][0]
    slow = max(r["slow_bytes_per_rank"]) / 1e6 if r["config"]["optimizer"] == "lookahead" else 0
    rows.append(f"| {f.stem} | {r['world_size']} | {r['samples_per_s']:.1f} | {r['comm_bytes_per_step'] / 1e6:.2f} | {slow:.1f} | {r['train_loss']:.3f} |")
for f in sorted(out.glob("*.failed")):
    rows.append(f"| {f.stem} | failed | | | | |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
echo "machine: $(head -2 "$OUT/machine.txt" | tail -1)"; echo "results in $OUT/ (table.md, one JSON per job)"
