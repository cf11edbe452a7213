#!/usr/bin/env bash
# GPU check of issue 28 (long samples on one GPU) in one command of at most BUDGET_S (default 420) seconds.
# Each section writes its JSON into $OUT as soon as it ends, so a run cut off still returns the finished ones:
#   plan     the planner's longest sample for this machine (GPU memory from nvidia-smi, host memory from
#            /proc/meminfo), random:llama3-8b with model.gradient_checkpointing=offload, model.tiled_mlp=on
#   seq32k, seq64k, seq128k   one training step of random:llama3-8b in NF4 at that many tokens (micro batch 1,
#            the options on): the trainer's peak GPU memory and step time, peak host RSS, the planner's figures
#            beside them (bench/long_seq.py --gpu-section). The first OOM stops the ladder (its JSON says so).
# The GPU machine lacks bitsandbytes and deepspeed: carry wheels in .whl/ as bench/gpu_issue14.sh does.
#   bash bench/gpu_long_seq.sh              # on the device machine
#   bash bench/gpu_long_seq.sh --dry-run    # on CPU: the same sections on random:smoke at 256-1,024 tokens
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_long_seq}; mkdir -p "$OUT"; export OUT
LOG="$OUT/log.txt"; : >"$LOG"
END=$(( $(date +%s) + ${BUDGET_S:-420} ))
PY=${PYTHON:-python}; [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export QLORA_DIST_CACHE=${QLORA_DIST_CACHE:-$PWD/.cache/models} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OPTIONS="model.gradient_checkpointing=offload model.tiled_mlp=on"

section() {  # section NAME SECONDS_WANTED COMMAND...: run it if that much time is left; returns its exit code
  local name=$1 want=$2 left=$(( END - $(date +%s) )); shift 2
  if [ "$left" -lt "$want" ]; then
    echo "{\"section\": \"$name\", \"skipped\": \"$left s left, wants $want\"}" >>"$OUT/sections.jsonl"; return 0
  fi
  local t0=$(date +%s); echo "=== $name: $* ($left s left)" >>"$LOG"
  timeout -s KILL "$left" "$@" >>"$LOG" 2>&1; local rc=$?
  echo "{\"section\": \"$name\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >>"$OUT/sections.jsonl"
  return $rc
}
left() { echo $(( END - $(date +%s) - ${1:-0} )); }

if [ "$DRY" = 1 ]; then
  MODEL=random:smoke; LENGTHS="256 512 1024"; GPU=80GB; HOST=128GB
else
  [ -d .whl ] && pip install -q --no-deps .whl/*.whl >>"$LOG" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
  MODEL=random:llama3-8b; LENGTHS="32768 65536 131072"
  GPU="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)MiB"
  HOST="$(awk '/MemTotal/ {print $2}' /proc/meminfo)KiB"
fi
section plan 20 sh -c "\"$PY\" -m qlora_dist plan --shape llama3-8b --gpu-memory $GPU --host-memory $HOST --max-seq \
  $OPTIONS --json > \"$OUT/plan.json\""
for n in $LENGTHS; do
  section "seq$n" 60 "$PY" bench/long_seq.py --gpu-section "$n" --model "$MODEL" --out "$OUT/seq$n.json" \
    --timeout-s "$(left 5)"
  rc=$?
  if [ "$rc" = 3 ]; then echo "{\"stopped\": \"out of memory at $n tokens\"}" >>"$OUT/sections.jsonl"; break; fi
done
cat "$OUT/sections.jsonl"
