#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and torch, transformers, safetensors installed): measure the training and
# pass peaks with CUDA (bench/memory.py --device cuda) in a few minutes, and write the JSON where the results
# live (or under $OUT when the device tool runs it). Its JSON joins bench/results/ next to the CPU results.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 280 python3 bench/memory.py --device cuda --budget-minutes 4 --out "$out/memory_gpu.json"
python3 bench/memory.py --table --out "$out/memory_gpu.json" || true
