#!/usr/bin/env bash
# The GPU checks of the scale-and-speed work, as one short run for a machine with a CUDA GPU:
# bf16 and compiled AdvCL steps at batch 512 beside the reference-style step, PGD-20 evaluation
# of 10,000 CIFAR-sized images, and a short bf16 pretraining run on the offline digits data.
# Every figure is appended to benchmarks/RESULTS.md with the device's name.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/pretrain_step.py --arch resnet18 --batch-size 512 --precision bf16 --steps 5 --warmup 2
python benchmarks/pretrain_step.py --arch resnet18 --batch-size 512 --precision bf16 --compile --steps 5 --warmup 3
python benchmarks/eval_speed.py --arch resnet18 --n 10000 --batch-size 1000 --device cuda
python -m advcl_cli pretrain --dataset digits --arch resnet18 --epochs 2 --batch-size 512 \
    --out "${TMPDIR:-/tmp}/advcl-gpu-check" --force --json
