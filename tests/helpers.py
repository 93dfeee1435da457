"""The notebook's pipeline steps, as tests call them (same functions, same order)."""
from pathlib import Path

import torch

import pelatun_utils as pu

CPU = torch.device("cpu")


def build_cache(model_dir: Path, data: Path, act_dir: Path, *, train_layers: int = 1, context_length: int = 32,
                batch_tokens: int = 128, part_tokens: int = 256, val_fraction: float = 0.0, seed: int = 0,
                dtype: str = "auto", max_samples: int = 0, blocks_per_pass: int = 1, keep_in_ram: bool = False):
    """Model -> samples -> cache -> embed -> peristalsis, as in pelatun.ipynb; returns (cache, stats, splits)."""
    config = pu.read_config(model_dir)
    weights = pu.Weights(model_dir, config)
    tokenizer = pu.load_tokenizer(model_dir)
    weight_dtype = pu.model_dtype(weights)
    compute = pu.pick_compute_dtype(dtype, CPU, weight_dtype)
    samples = pu.load_samples(data, tokenizer, context_length)
    if max_samples:
        samples = samples[:max_samples]
    splits = pu.split_samples(samples, val_fraction, seed)
    identity = pu.cache_identity(model_dir, Path(data), {
        "context_length": context_length, "long_samples": "window", "max_samples": max_samples,
        "val_fraction": val_fraction, "seed": seed, "storage_dtype": pu.dtype_name(weight_dtype),
        "compute_dtype": pu.dtype_name(compute)})
    target = config.num_hidden_layers - train_layers
    cache = pu.open_cache(act_dir, identity, target)
    if cache is not None:
        pu.verify_cache(cache)
    else:
        cache = pu.create_cache(act_dir, identity, splits, config.hidden_size, part_tokens)
    cache.ram = {} if keep_in_ram else None  # as the plan decides in the notebook
    pu.embed(cache, weights, CPU, compute)
    stats = pu.peristalsis(cache, weights, target, CPU, compute, batch_tokens, blocks_per_pass, keep_in_ram)
    return cache, stats, splits


def write_text(path: Path, n: int = 40) -> Path:
    """A small English text of our own, long enough for several windows."""
    lines = [f"Line {i}: the peristaltic pass moves every sample through block {i % 7} before the next one "
             f"is loaded, and the disk holds what the memory cannot." for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path
