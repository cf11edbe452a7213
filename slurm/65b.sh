#!/usr/bin/env bash
# QLoRA on LLaMA-65B with the paper's 65b-all preset: 2 node(s) x 8 GPUs, one rank per GPU, ZeRO-3 (the NF4 base partitioned).
#   MODEL_PATH=/models/llama-65b OUTPUT_DIR=/shared/runs/65b sbatch slurm/65b.sh
# Another row of the recipe: PRESET=65b-oasst1 (or -hh-rlhf, -longform) sbatch slurm/65b.sh
# Requeued on preemption or ~5 minutes before the time limit: the same job resumes from its newest checkpoint.
#SBATCH --job-name=qlora-65b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

PRESET="${PRESET:-65b-all}"
DEFAULT_DS_CONFIG=zero3
here="$(dirname "$0")"; [ -f "$here/common.sh" ] || here="${SLURM_SUBMIT_DIR:-.}/slurm"
source "$here/common.sh"
