#!/usr/bin/env bash
# The GPU checks as one short run for a machine with a CUDA GPU (benchmarks/gpu_family.py: every
# pretraining method at batch 512 in bf16, eager and compiled, beside the reference-style step;
# PGD-20 over 10,000 CIFAR-sized images and AutoAttack; the AFF step; the estimated cost of a
# 1000-epoch run and of a benchmark cell), then a short bf16 pretraining run through the CLI.
# The table is appended to benchmarks/RESULTS.md with the device's name.
#
#   bash benchmarks/gpu.sh            # on a GPU (about 8 minutes on an H100, untested so far)
#   bash benchmarks/gpu.sh --dry-run  # the same script on the CPU at toy sizes (CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=${PYTHON:-python}
if [ "${1:-}" = "--dry-run" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  "$python" benchmarks/gpu_family.py --dry-run --results "${ADVCL_GPU_RESULTS:-$out/RESULTS.md}"
  "$python" -m advcl_cli pretrain --dataset digits --arch resnet18-tiny --limit 16 --epochs 1 --batch-size 8 \
      --pgd-steps 1 --precision bf16 --channels-last on --device cpu --out "$out/run" --force --json
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$python" benchmarks/gpu_family.py
"$python" -m advcl_cli pretrain --dataset digits --arch resnet18 --epochs 2 --batch-size 512 \
    --out "${TMPDIR:-/tmp}/advcl-gpu-check" --force --json
