#!/usr/bin/env bash
# The GPU check of sema_hf (issue 12): the update/switch benchmark timed with CUDA events against the peers (fp32,
# bf16), no host sync on the update path, a bf16 Trainer job, DeepSpeed ZeRO-3 ("auto" persistence threshold) and FSDP2
# with activation checkpointing at world size 1 against a plain run, shard_under_ddp over NCCL, and the hand-written
# accelerate loop with sema_hf.SEMA (bf16, gradient accumulation, save_state/load_state resume). About 8 minutes at
# most; writes bench/results/gpu_check.json (or $GPU_CHECK_OUT). See bench/gpu_check.py for the parts.
#
#   bash bench/gpu_check.sh              # on a CUDA machine; without CUDA it says so and exits 0
#   bash bench/gpu_check.sh --dry-run    # CPU, tiny sizes: checks the script itself, proves nothing about GPUs
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry_run=1; done
if [[ $dry_run == 0 ]] && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing was run."
  exit 0
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ $dry_run == 1 ]]; then export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1; fi
workdir=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$workdir"' EXIT
export GPU_CHECK_WORKDIR="$workdir"
out=${GPU_CHECK_OUT:-bench/results/gpu_check.json}
if [[ $dry_run == 1 && -z ${GPU_CHECK_OUT:-} ]]; then out="${TMPDIR:-/tmp}/gpu_check_dry_run.json"; fi
# 8 minutes in all: the script skips parts past --budget-s (450 s); timeout is the hard stop.
timeout 480 python bench/gpu_check.py --out "$out" "$@"
