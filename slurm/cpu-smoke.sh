#!/usr/bin/env bash
# The same wiring on CPU nodes (the tests run it on a local two-node Slurm cluster): 2 nodes x 2 tasks,
# ZeRO-2 over gloo, the tiny random LLaMA unless MODEL_PATH says otherwise.
#   MODEL_PATH=tiny-llama OUTPUT_DIR=/tmp/smoke sbatch slurm/cpu-smoke.sh
#SBATCH --job-name=qlora-cpu-smoke
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

MODEL_PATH="${MODEL_PATH:-tiny-llama}"
DEFAULT_DS_CONFIG=zero2
here="$(dirname "$0")"; [ -f "$here/common.sh" ] || here="${SLURM_SUBMIT_DIR:-.}/slurm"
source "$here/common.sh"
