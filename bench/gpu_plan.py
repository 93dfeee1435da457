"""The planner's numbers for Llama-2-7B on a free Colab T4: where the disk, not the GPU, sets the pace.

python bench/gpu_plan.py  ->  bench/results/gpu_plan.json (README quotes it through bench/update_readme.py)

Pure arithmetic from pelatun_utils.pass_memory (no GPU needed): for each disk speed, the blocks per pass
that fit the T4's memory, the hidden-state bytes moved, and the seconds of compute versus disk per pass.
Beside it, the weight bytes each schedule reads: PeLaTun reads every block once; layer streaming (AirLLM,
accelerate disk offload) reads every block once per forward call, and the data takes one call per
PASS_BATCH_TOKENS tokens. The GPU throughput is an assumption stated in the JSON (a T4 sustains roughly
25 TFLOP/s of fp16 matmul).
"""
import json
import math
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pelatun_utils as pu  # noqa: E402

GPUS = {"T4 16 GB": 15 * 2**30, "8 GB card": 8 * 2**30}  # usable GPU memory
HOST_RAM, FP16_FLOPS = int(12.7 * 2**30), 25e12  # Colab's RAM; a T4-class GPU's sustained fp16 matmul
SAMPLES, CONTEXT = 1000, 4096
PASS_BATCH_TOKENS = 8192  # the notebook's default; the streaming tools get the same tokens per forward call
DISKS = {"Colab local disk (~150 MB/s)": 150e6, "fast NVMe (~2 GB/s)": 2e9}


def llama2_7b():
    """The exact Llama-2-7B config."""
    c = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    c._attn_implementation = "sdpa"
    return c


def plan(config, gpu_memory: int, disk: float) -> dict:
    """Blocks per pass that fit the GPU, bytes moved, and seconds of compute vs disk for the pass to layer 31."""
    tokens = SAMPLES * CONTEXT
    cache = tokens * config.hidden_size * 2  # fp16
    part = 65536 * config.hidden_size * 2
    cuda, f16 = torch.device("cuda"), torch.float16
    blocks = config.num_hidden_layers - 1
    fits = [g for g in range(1, blocks + 1)
            if (m := pu.pass_memory(config, g, g < blocks, cuda, f16, f16, 8192, part, 0, 0))["total"] <= 0.9 * gpu_memory
            and m["host_total"] <= 0.8 * HOST_RAM]
    g = max(fits)
    passes = math.ceil(blocks / g)
    flops_block = 2 * pu.block_parameter_count(config) * tokens  # matmuls; attention adds ~10% at 4096
    compute = flops_block * blocks / FP16_FLOPS
    io_bytes = cache + passes * 2 * cache  # embed writes once; each pass reads and writes the cache
    weights = blocks * pu.block_parameter_count(config) * 2  # fp16 blocks, each read once by PeLaTun
    calls = math.ceil(tokens / PASS_BATCH_TOKENS)  # a streaming tool reads all of them for every forward call
    return {"blocks_per_pass": g, "passes": passes, "cache_bytes": cache, "hidden_bytes_moved": io_bytes,
            "compute_seconds": compute, "disk_seconds": io_bytes / disk,
            "one_block_per_pass_disk_seconds": (cache + blocks * 2 * cache) / disk,
            "bound": "disk" if io_bytes / disk > compute else "compute",
            "weight_bytes_read": weights, "weight_seconds": weights / disk,
            "streaming_forward_calls": calls, "streaming_weight_bytes_read": calls * weights,
            "streaming_weight_seconds": calls * weights / disk}


def markdown_table(results: dict) -> str:
    """README table: one row per disk."""
    rows = ["| GPU, disk | blocks per pass | passes | cache | moved | compute | disk time | one block per pass: disk time | bound by "
            "| weights read (time) | layer streaming: weights read (time) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, r in results["plans"].items():
        rows.append(f"| {name} | {r['blocks_per_pass']} | {r['passes']} | {r['cache_bytes'] / 2**30:.0f} GiB | "
                    f"{r['hidden_bytes_moved'] / 2**30:.0f} GiB | {r['compute_seconds'] / 60:.0f} min | "
                    f"{r['disk_seconds'] / 60:.0f} min | {r['one_block_per_pass_disk_seconds'] / 60:.0f} min | {r['bound']} | "
                    f"{r['weight_bytes_read'] / 2**30:.0f} GiB ({r['weight_seconds'] / 60:.1f} min) | "
                    f"{r['streaming_weight_bytes_read'] / 2**40:.1f} TiB ({r['streaming_weight_seconds'] / 3600:.1f} h) |")
    a = results["assumptions"]
    rows.append(f"\nLlama-2-7B, {a['samples']} samples x {a['context']} tokens, {a['fp16_tflops']:.0f} TFLOP/s of fp16 "
                f"assumed, {a['host_ram_gib']} GiB RAM (Colab); layer streaming: {a['pass_batch_tokens']} tokens per forward "
                f"call, every block read per call; from `bench/gpu_plan.py` (planner arithmetic, not a run).")
    return "\n".join(rows)


def main():
    config = llama2_7b()
    results = {"assumptions": {"samples": SAMPLES, "context": CONTEXT, "host_ram_gib": 12.7,
                               "fp16_tflops": FP16_FLOPS / 1e12, "pass_batch_tokens": PASS_BATCH_TOKENS},
               "plans": {f"{gpu}, {disk}": plan(config, mem, speed)
                         for gpu, mem in GPUS.items() for disk, speed in DISKS.items()}}
    out = ROOT / "bench" / "results" / "gpu_plan.json"
    out.write_text(json.dumps(results, indent=1))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
