#!/usr/bin/env bash
# GPU check of issue 14 in one command of at most BUDGET_S (default 360) seconds. Sections in the issue's
# order; each writes its JSON into $OUT as soon as it ends, so a run cut off still returns the finished ones:
#   1. e2e      `qlora-dist train` at the 7B shape: 20 steps, a save at 10, SIGKILL, the same command
#               resumes and finishes, PEFT loads the adapter (bench/gpu_e2e.py)
#   2. speed7   bench/speed.py --shape 7b under 24 GB: ratio, MFU, peak memory
#   3. speed65  bench/speed.py --shape 65b under 48 GB, with the time of one save at the 65B shape (adapter
#               export and whole checkpoint, --time-save on our best run)
#   3b. paged   optim.master_weights=paged against gpu at 7B, 5 steps each: equal losses, the allocator peak
#               down by the planned fp32 master bytes (bench/paged_masters_ab.py)
#   4. compile  the compile A/B at 7B (model.compile_kernels=true; the default run is section 2)
#   5. ranks2   two ranks on the one GPU: under NCCL the launch error (exit 2, before loading); under
#               dist.backend=gloo the ranks share it (what DeepSpeed's collectives on CUDA tensors over gloo did)
#   6. offload65 if time remains: 65B with dist.ds_config=zero2_offload (fp32 masters and gradients in host
#               memory: the planner then picks 8 x 512 at 45.1 GB, the reference's batch) against the reference
# At most 8 files come back from $OUT: the section JSONs, sections.jsonl (exit and seconds of each) and log.txt.
#   bash bench/gpu_issue14.sh              # on the device machine (carry .whl/: bitsandbytes, deepspeed, ...)
#   bash bench/gpu_issue14.sh --dry-run    # on CPU: the same sections on tiny shapes, to check the script
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_issue14}; mkdir -p "$OUT"; export OUT
LOG="$OUT/log.txt"; : >"$LOG"
END=$(( $(date +%s) + ${BUDGET_S:-360} ))
PY=${PYTHON:-python}; [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export QLORA_DIST_CACHE=${QLORA_DIST_CACHE:-$PWD/.cache/models} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

section() {  # section NAME SECONDS_WANTED COMMAND...: run it if that much time is left, with what is left
  local name=$1 want=$2 left=$(( END - $(date +%s) )); shift 2
  if [ "$left" -lt "$want" ]; then
    echo "{\"section\": \"$name\", \"skipped\": \"$left s left, wants $want\"}" >>"$OUT/sections.jsonl"; return
  fi
  local t0=$(date +%s); echo "=== $name: $* ($left s left)" >>"$LOG"
  timeout -s KILL "$left" "$@" >>"$LOG" 2>&1; local rc=$?
  echo "{\"section\": \"$name\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >>"$OUT/sections.jsonl"
}
left() { echo $(( END - $(date +%s) - ${1:-0} )); }

if [ "$DRY" = 1 ]; then
  section e2e 30 "$PY" bench/gpu_e2e.py --dry-run --steps 6 --out "$OUT"
  section speed7 30 "$PY" bench/speed.py --shape 7b --dry-run --out "$OUT" --timeout-s "$(left)"
  section speed65 30 "$PY" bench/speed.py --shape 65b --dry-run --time-save --out "$OUT" --timeout-s "$(left)"
  section paged 30 "$PY" bench/paged_masters_ab.py --dry-run --out "$OUT" --timeout-s "$(left)"
  section compile 30 "$PY" bench/speed.py --shape 7b --dry-run --ours model.compile_kernels=true --out "$OUT" \
    --timeout-s "$(left)"
  section ranks2 20 "$PY" -m torch.distributed.run --nproc_per_node 2 -m qlora_dist train model.path=tiny-llama \
    train.max_steps=2 train.global_batch_size=2 train.micro_batch_size=1 data.num_train=16 data.num_eval=2 eval.at_start=false \
    eval.at_end=false train.output_dir="$(mktemp -d)/run"
else
  [ -d .whl ] && pip install -q --no-deps .whl/*.whl >>"$LOG" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
  section e2e 120 "$PY" bench/gpu_e2e.py --out "$OUT" --timeout-s 100
  section speed7 100 "$PY" bench/speed.py --shape 7b --warmup 1 --steps 3 --timeout-s "$(left 5)"
  section speed65 150 "$PY" bench/speed.py --shape 65b --warmup 1 --steps 2 --time-save --timeout-s "$(left 5)"
  section paged 150 "$PY" bench/paged_masters_ab.py --out "$OUT" --timeout-s "$(left 5)"
  section compile 90 "$PY" bench/speed.py --shape 7b --warmup 2 --steps 3 --ours model.compile_kernels=true \
    --timeout-s "$(left 5)"
  for backend in nccl gloo; do  # nccl: the launch error before loading (exit 2); gloo: ranks share the GPU
    section "ranks2_$backend" 40 "$PY" -m torch.distributed.run --nproc_per_node 2 -m qlora_dist train \
      model.path=random:7b dist.backend=$backend train.max_steps=3 train.global_batch_size=2 \
      train.micro_batch_size=1 eval.at_start=false eval.at_end=false train.output_dir="$(mktemp -d)/run"
  done
  section offload65 150 "$PY" bench/speed.py --shape 65b --warmup 1 --steps 2 --ours dist.ds_config=zero2_offload \
    --timeout-s "$(left 5)"
fi
cat "$OUT/sections.jsonl"
