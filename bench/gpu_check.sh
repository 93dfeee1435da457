#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (python3 with CUDA torch, transformers, accelerate and safetensors; AirLLM too:
# pip install --no-deps airllm==4.0.0): the speed benchmark with every contender on the GPU (bench/peristalsis.py
# --device cuda, the synthetic Llama-2-7B shape, under 5 minutes), then the training and pass peaks with CUDA
# (bench/memory.py --device cuda, about 4 minutes). The JSON is written where the results live (or under $OUT when
# the device tool runs it) and joins bench/results/ next to the CPU results.
#   TOKENIZER_FROM=DIR   tokenizer files for the synthetic model (default models/SmolLM2-135M-Instruct, which the
#                        notebook's first run writes); wheels under .whl/ are installed first (a machine offline).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/pelatun_site .whl/*.whl && export PYTHONPATH=/tmp/pelatun_site
fi
export PYTHONUNBUFFERED=1
timeout 290 python3 bench/peristalsis.py --device cuda --models syn7b --threads 8 --work /tmp/pelatun_bench_gpu \
  --tokenizer-from "${TOKENIZER_FROM:-models/SmolLM2-135M-Instruct}" --out "$out/peristalsis_gpu.json" \
  2>&1 | tee "$out/peristalsis_gpu.log"
python3 bench/peristalsis.py --table "$out/peristalsis_gpu.json"
timeout 250 python3 bench/memory.py --device cuda --budget-minutes 3 --out "$out/memory_gpu.json"
python3 bench/memory.py --table --out "$out/memory_gpu.json"
