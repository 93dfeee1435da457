"""Shared fixtures: the real SmolLM2 (converted once) and tiny random models built with the real classes."""
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers

import pelatun_utils as pu

REPO = Path(__file__).resolve().parents[1]

TINY = {  # architecture -> config class and its extra settings; small shapes, GQA where supported
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 4096}),
    "qwen2": (transformers.Qwen2Config, {}),
}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a sharded safetensors directory (converted once into models/)."""
    return pu.resolve_model("smollm2-135m", REPO / "models")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return pu.load_tokenizer(smollm2_dir)


def make_tiny_model(out: Path, arch: str = "llama", dtype=torch.float32, tied: bool = False, layers: int = 4,
                    tokenizer_dir: Path | None = None, seed: int = 0, single_file: bool = False,
                    config: dict | None = None) -> Path:
    """Save a random model of the real transformers class as sharded safetensors (+ tokenizer files);
    `config` overrides settings of the architecture's config."""
    Config, extra = TINY[arch]
    extra = {**extra, **(config or {})}
    config = Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    tie_word_embeddings=tied, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms too, so that a mixed-up norm cannot go unnoticed
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(out, max_shard_size="10GB" if single_file else "2MB")
    if tokenizer_dir is not None:
        for name in pu.TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture
def tiny_model(tmp_path, smollm2_dir):
    """Factory: tiny_model(arch='llama', dtype=torch.float32, tied=False, layers=4) -> model dir."""
    def make(arch="llama", dtype=torch.float32, tied=False, layers=4, name=None, **kw):
        return make_tiny_model(tmp_path / (name or f"{arch}-{str(dtype)[6:]}-{layers}{'-tied' if tied else ''}"),
                               arch, dtype, tied, layers, smollm2_dir, **kw)
    return make
