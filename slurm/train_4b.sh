#!/usr/bin/env bash
# Qwen3-VL-4B-Instruct, DAPO + EASE: 1 node x 8 GPUs; TP and PP come from the config.
#
#   sbatch slurm/train_4b.sh [section.key=value ...]          # from the repo root
#
# The same script on a CPU-only cluster, shrunk from the command line (gloo on CPU):
#   CONFIG=examples/tiny_cpu_ease.yaml sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 \
#       slurm/train_4b.sh checkpoint.dir=/tmp/x train.steps=4
#
# Positional arguments are dotted config overrides; environment (CONFIG, ENTRY, RUN_DIR, ...),
# preemption and resume: slurm/common.sh.
#SBATCH --job-name=ease-qwen3vl-4b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@900
#SBATCH --requeue
set -euo pipefail

REPO=${MEGATRON_EASE_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
CONFIG=${CONFIG:-examples/qwen3vl_4b_ease.yaml}
[ -f "$REPO/slurm/common.sh" ] || {
  echo "error: $REPO/slurm/common.sh not found: submit from the megatron_ease repo root or set MEGATRON_EASE_ROOT" >&2
  exit 2
}
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
launch_training "$@"
