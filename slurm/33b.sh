#!/usr/bin/env bash
# QLoRA on LLaMA-33B with the paper's 33b-all preset: 1 node(s) x 8 GPUs, one rank per GPU, ZeRO-2.
#   MODEL_PATH=/models/llama-33b OUTPUT_DIR=/shared/runs/33b sbatch slurm/33b.sh
# Another row of the recipe: PRESET=33b-oasst1 (or -hh-rlhf, -longform) sbatch slurm/33b.sh
# Requeued on preemption or ~5 minutes before the time limit: the same job resumes from its newest checkpoint.
#SBATCH --job-name=qlora-33b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

PRESET="${PRESET:-33b-all}"
DEFAULT_DS_CONFIG=zero2
here="$(dirname "$0")"; [ -f "$here/common.sh" ] || here="${SLURM_SUBMIT_DIR:-.}/slurm"
source "$here/common.sh"
