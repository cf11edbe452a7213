# Shared by slurm/*.sh (sourced, not run): one task per GPU through srun, every rank running the same
# `python -m qlora_dist train`. Ranks find each other from Slurm's own environment (qlora_dist/dist.py:
# rank = SLURM_PROCID, rendezvous at the first host of the node list, port from the job id), so the
# nodes need nothing but the Python environment.
#
# Site settings, from the environment:
#   MODEL_PATH   local Hugging Face LLaMA folder (required)
#   OUTPUT_DIR   run folder on a filesystem every node sees (required); the same folder = resume
#   QLORA_ARGS   extra key=value overrides, e.g. "train.save_steps=100 train.max_memory_per_gpu=40GiB"
#   DS_CONFIG    zero2 | zero3 | zero3_offload | path (default: the script's)
#   PYTHON       the interpreter of the environment with qlora-dist installed (default: python3)
#   DRY_RUN=1    print each rank's command and rendezvous address; start nothing
set -euo pipefail

: "${MODEL_PATH:?set MODEL_PATH to the local Hugging Face LLaMA folder to fine-tune}"
: "${OUTPUT_DIR:?set OUTPUT_DIR to the run folder (shared by all nodes; the same folder resumes)}"
PYTHON="${PYTHON:-python3}"

cmd=("$PYTHON" -m qlora_dist train)
[ -n "${PRESET:-}" ] && cmd+=(--preset "$PRESET")
cmd+=("model.path=$MODEL_PATH" "train.output_dir=$OUTPUT_DIR" "dist.ds_config=${DS_CONFIG:-$DEFAULT_DS_CONFIG}")
# shellcheck disable=SC2206  # QLORA_ARGS is a list of key=value words
[ -n "${QLORA_ARGS:-}" ] && cmd+=(${QLORA_ARGS})

if [ "${DRY_RUN:-0}" = "1" ]; then
    exec "$PYTHON" -m qlora_dist launch-plan -- "${cmd[@]}"
fi
# The preflight, once, on the batch host before any rank starts: a bad path, config or memory cap fails
# here in seconds (exit 2, one line per problem) instead of after every rank has loaded the model.
"$PYTHON" -m qlora_dist check "${cmd[@]:4}" --world-size "${SLURM_NTASKS:-1}"
# --kill-on-bad-exit: one dead rank ends the step (and the job) at once instead of at a collective timeout.
exec srun --kill-on-bad-exit=1 --cpu-bind=none "${cmd[@]}"
