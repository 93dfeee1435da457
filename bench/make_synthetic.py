"""Write a synthetic Llama-2-7B or Llama-2-70B: the exact config and tensor shapes, random weights.

HONEST FOR MEMORY AND SPEED, NEVER FOR QUALITY. The weights are random (normal, std 0.02; norm
weights near 1), so a synthetic model reads, moves and multiplies exactly the bytes a real one does
(per block, per shard, per token), but its outputs, losses and generations mean nothing. Never
quote a loss, an accuracy or an answer from it; quote seconds, tokens/s and bytes.

Layout: what `save_pretrained` writes for Llama-2 in transformers 5: config.json (LlamaConfig of
the shape, "architectures": ["LlamaForCausalLM"], "dtype" and "torch_dtype" set, untied lm_head,
bos 1, eos 2), sharded safetensors named model-00001-of-0000N.safetensors (split as
huggingface_hub splits a state dict; an index even when N is 1) and model.safetensors.index.json
(metadata.total_size = the tensors' bytes, weight_map). The tensor names and shapes are checked
against a LlamaForCausalLM built on the meta device before anything is written.

Fewer blocks (a full 70B is 138 GB in fp16):
  layers=N                     the first N blocks; config.json says num_hidden_layers = N.
  keep_first=a, keep_last=b    the first a and last b blocks of the full model, written as the
                               blocks 0..a+b-1 of a valid model with num_hidden_layers = a+b.
The embedding, the final norm and the lm_head are always written. config.json records where the
blocks came from: "pelatun_synthetic": {"shape", "original_layers", "kept": [original indices],
"seed", "note"}. Each tensor's values depend only on (seed, shape, its name in the full model), so
block 79 of a keep_last=1 70B is the block 79 of the full one.

Memory: one shard's tensors at a time (max_shard_size, 2 GB by default), generated directly in the
target dtype; safetensors.torch.save_file (0.8 here) writes them without another copy.

Tokenizer: none is written (the model loads without one). --tokenizer-from DIR copies another
model's tokenizer files for smoke runs of the pipeline; its vocabulary is not Llama-2's, and any
token id >= 32000 fails in the embedding.

Usage:
  python bench/make_synthetic.py --shape 7b --layers 2 --out /tmp/syn7b2
  python bench/make_synthetic.py --shape 70b --keep-first 1 --keep-last 1 --out /data/syn70b-1+1 \\
      --tokenizer-from models/SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors.torch import save_file

SHAPES = {  # the published Llama-2 config.json values that differ between the two
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8},
}
COMMON = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": None, "pretraining_tp": 1, "attention_bias": False,
          "mlp_bias": False, "use_cache": True}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json"]  # pelatun_utils.TOKENIZER_FILES and a few more
STD = 0.02
NOTE = "random weights: honest for memory and speed, never for quality"


def kept_layers(original: int, layers=None, keep_first=None, keep_last=None) -> list[int]:
    """Original indices of the blocks to write: all, the first `layers`, or the first a and last b."""
    if layers is not None and (keep_first is not None or keep_last is not None):
        raise ValueError("Give either layers=N or keep_first/keep_last, not both.")
    if keep_first is not None or keep_last is not None:
        a, b = keep_first or 0, keep_last or 0
        if a < 0 or b < 0 or a + b < 1 or a + b > original:
            raise ValueError(f"keep_first + keep_last must be between 1 and {original}; got {a} + {b}.")
        return list(range(a)) + list(range(original - b, original))
    n = original if layers is None else layers
    if not 1 <= n <= original:
        raise ValueError(f"layers must be between 1 and {original}; got {n}.")
    return list(range(n))


def make_config(shape: str = "7b", layers=None, keep_first=None, keep_last=None, dtype: str = "float16",
                seed: int = 0, config_overrides: dict | None = None):
    """The LlamaConfig of the shape, with num_hidden_layers = the kept blocks and the pelatun_synthetic record."""
    from transformers import LlamaConfig
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    kwargs = {**COMMON, **SHAPES[shape], **(config_overrides or {})}
    original = kwargs["num_hidden_layers"]
    kept = kept_layers(original, layers, keep_first, keep_last)
    kwargs["num_hidden_layers"] = len(kept)
    config = LlamaConfig(**kwargs)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = DTYPES[dtype]
    config.pelatun_synthetic = {"shape": shape, "original_layers": original, "kept": kept, "seed": seed,
                                "note": NOTE}
    if config_overrides:
        config.pelatun_synthetic["config_overrides"] = dict(config_overrides)
    return config


def plan_tensors(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of LlamaForCausalLM's checkpoint for this config, in state_dict order."""
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    plan = {"model.embed_tokens.weight": (V, H)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        plan.update({
            p + "self_attn.q_proj.weight": (q, H),       # [heads*head_dim, hidden]
            p + "self_attn.k_proj.weight": (kv, H),      # [kv_heads*head_dim, hidden]
            p + "self_attn.v_proj.weight": (kv, H),      # [kv_heads*head_dim, hidden]
            p + "self_attn.o_proj.weight": (H, q),       # [hidden, heads*head_dim]
            p + "mlp.gate_proj.weight": (I, H),          # [intermediate, hidden]
            p + "mlp.up_proj.weight": (I, H),            # [intermediate, hidden]
            p + "mlp.down_proj.weight": (H, I),          # [hidden, intermediate]
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        })
    plan["model.norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        plan["lm_head.weight"] = (V, H)                  # untied in Llama-2
    return plan


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a LlamaForCausalLM built on the meta device (no memory); tied lm_head left out."""
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_plan(config, plan: dict[str, tuple[int, ...]]) -> None:
    """Refuse a plan whose names or shapes differ from transformers' LlamaForCausalLM."""
    expected = meta_shapes(config)
    if plan != expected:
        diff = sorted(set(plan.items()) ^ set(expected.items()))[:4]
        raise RuntimeError(f"Planned tensors differ from LlamaForCausalLM's state_dict: {diff}")


def original_name(name: str, kept: list[int]) -> str:
    """'model.layers.1.x' of a keep_first=1 70B -> 'model.layers.79.x': the tensor's name in the full model."""
    if name.startswith("model.layers."):
        j, rest = name[len("model.layers."):].split(".", 1)
        return f"model.layers.{kept[int(j)]}.{rest}"
    return name


def tensor_seed(seed: int, shape: str, name: str) -> int:
    """A stable 63-bit seed per (seed, shape, full-model name), independent of sharding and kept blocks."""
    return (seed << 32 | zlib.crc32(f"{shape}:{name}".encode())) & (2**63 - 1)


def fill(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random tensor: norm weights ~ N(1, 0.02), matrices ~ N(0, 0.02), generated in dtype."""
    g = torch.Generator().manual_seed(seed)
    mean = 1.0 if name.endswith("norm.weight") else 0.0
    return torch.empty(shape, dtype=dtype).normal_(mean, STD, generator=g)


def plan_shards(plan: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_size) -> tuple[dict, int]:
    """({shard file: [names]}, total bytes), split like huggingface_hub, always named model-0000i-of-0000N."""
    split = split_state_dict_into_shards_factory(
        plan, get_storage_size=lambda shape: torch.Size(shape).numel() * dtype.itemsize,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    names = list(split.filename_to_tensors.values())
    n = len(names)
    shards = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": ns for i, ns in enumerate(names)}
    return shards, split.metadata["total_size"]


def write_config(config, out: Path, dtype: str) -> None:
    """config.json: the full LlamaConfig, plus torch_dtype and a top-level rope_theta for transformers 4.x."""
    d = config.to_dict()
    d.update({"dtype": dtype, "torch_dtype": dtype, "rope_theta": config.rope_parameters["rope_theta"],
              "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    (out / "config.json").write_text(json.dumps(dict(sorted(d.items())), indent=2) + "\n")


def copy_tokenizer(src: str | Path, out: Path, vocab_size: int) -> list[str]:
    """Copy another model's tokenizer files (smoke runs only); warn when its ids can exceed the vocab."""
    src = Path(src)
    copied = [n for n in TOKENIZER_FILES if (src / n).exists()]
    if not copied:
        raise FileNotFoundError(f"No tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {src}.")
    for n in copied:
        shutil.copy(src / n, out / n)
    try:
        from transformers import AutoTokenizer
        size = len(AutoTokenizer.from_pretrained(out))
    except Exception as e:  # an odd tokenizer should not cost the weights just written
        print(f"warning: could not load the copied tokenizer ({type(e).__name__}: {e})", file=sys.stderr)
        return copied
    if size > vocab_size:
        print(f"warning: the tokenizer from {src} has {size} tokens but the model's vocab is {vocab_size}: "
              f"text with token ids >= {vocab_size} will fail in the embedding. Smoke runs only.", file=sys.stderr)
    return copied


def make_synthetic(out_dir, shape: str = "7b", layers=None, keep_first=None, keep_last=None,
                   dtype: str = "float16", max_shard_size="2GB", seed: int = 0, *, tokenizer_from=None,
                   config_overrides: dict | None = None, overwrite: bool = False) -> dict:
    """Write the synthetic model directory shard by shard; returns a summary (shards, bytes, seconds)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--force) to replace it.")
    config = make_config(shape, layers, keep_first, keep_last, dtype, seed, config_overrides)
    plan = plan_tensors(config)
    check_plan(config, plan)
    torch_dtype = DTYPES[dtype]
    shards, total = plan_shards(plan, torch_dtype, max_shard_size)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    free = shutil.disk_usage(tmp).free
    if total > free:
        shutil.rmtree(tmp)
        raise OSError(f"{out} needs {total / 1e9:.1f} GB but {free / 1e9:.1f} GB is free; write fewer blocks.")
    kept = config.pelatun_synthetic["kept"]
    for k, (shard, names) in enumerate(shards.items()):
        tensors = {n: fill(n, plan[n], torch_dtype, tensor_seed(seed, shape, original_name(n, kept)))
                   for n in names}
        save_file(tensors, tmp / shard, metadata={"format": "pt"})
        del tensors  # one shard in memory at a time
        print(f"  {shard}: {len(names)} tensors ({k + 1}/{len(shards)}, {time.perf_counter() - t0:.1f} s)",
              flush=True)
    index = {"metadata": {"total_size": total},
             "weight_map": {n: s for s, names in shards.items() for n in names}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(config, tmp, dtype)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, tmp, config.vocab_size)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"out": str(out), "shape": shape, "num_hidden_layers": config.num_hidden_layers, "kept": kept,
            "dtype": dtype, "shards": len(shards), "total_size": total,
            "seconds": round(time.perf_counter() - t0, 2)}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Honest for memory and speed, "
                                "never for quality.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (replaced with --force)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--layers", type=int, help="write the first N blocks; config says N")
    p.add_argument("--keep-first", type=int, help="write the first A blocks of the full model...")
    p.add_argument("--keep-last", type=int, help="...and its last B blocks; config says A+B")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--max-shard-size", default="2GB", help="shard size limit, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-from", help="copy tokenizer files from this directory (smoke runs only: "
                   "its vocabulary is not Llama-2's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """Run the command line and print the summary with the peak RSS."""
    a = parse_args(argv)
    try:
        summary = make_synthetic(a.out, a.shape, a.layers, a.keep_first, a.keep_last, a.dtype, a.max_shard_size,
                                 a.seed, tokenizer_from=a.tokenizer_from, overwrite=a.force)
    except (ValueError, OSError) as e:  # bad options, existing --out, not enough disk
        sys.exit(f"error: {e}")
    summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
