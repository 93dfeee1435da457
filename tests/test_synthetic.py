"""bench/make_synthetic.py: exact Llama-2 configs and tensor layout, a valid index, loadable by transformers and by
PeLaTun. Real 7B/70B shapes are checked through the plan (no tensors); written directories use a small hidden size."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import pelatun_utils as pu
from bench import make_synthetic as ms

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 1000}  # a 7B/70B config with small matrices, for writing in tests
CPU = torch.device("cpu")


def write_small(out: Path, **kw) -> Path:
    """A small-override synthetic model in several shards."""
    kw.setdefault("layers", 2)
    kw.setdefault("config_overrides", SMALL)
    ms.make_synthetic(out, "7b", max_shard_size="100KB", **kw)
    return out


def reference_shapes(config) -> dict:
    """{name: shape} of transformers' LlamaForCausalLM for this config, built on the meta device."""
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def written_tensors(model_dir: Path) -> dict:
    """{name: (shape, dtype)} of every tensor in the directory's shards (headers only)."""
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


@pytest.mark.parametrize("shape,layers", [("7b", 1), ("7b", None), ("70b", 1)])
def test_plan_matches_llama_for_causal_lm(shape, layers):
    config = ms.make_config(shape, layers=layers)
    plan = ms.plan_tensors(config)
    assert plan == reference_shapes(config)
    assert list(plan) == list(reference_shapes(config))  # state_dict order too
    if shape == "7b":
        assert plan["model.embed_tokens.weight"] == plan["lm_head.weight"] == (32000, 4096)
        assert plan["model.layers.0.mlp.down_proj.weight"] == (4096, 11008)
        block = sum(torch.Size(s).numel() for n, s in plan.items() if n.startswith("model.layers.0."))
        assert block == 202_383_360  # 202.4M parameters per 7B block (NOTES.md)
    else:
        assert plan["model.layers.0.self_attn.k_proj.weight"] == (1024, 8192)  # 8 kv heads x 128


def test_exact_llama2_configs():
    c7 = ms.make_config("7b")
    assert (c7.hidden_size, c7.num_hidden_layers, c7.num_attention_heads, c7.num_key_value_heads,
            c7.intermediate_size, c7.vocab_size, c7.max_position_embeddings) == (4096, 32, 32, 32, 11008, 32000, 4096)
    c70 = ms.make_config("70b")
    assert (c70.hidden_size, c70.num_hidden_layers, c70.num_attention_heads, c70.num_key_value_heads,
            c70.intermediate_size, c70.vocab_size) == (8192, 80, 64, 8, 28672, 32000)
    for c in (c7, c70):
        assert (c.rms_norm_eps, c.rope_parameters["rope_theta"], c.tie_word_embeddings, c.bos_token_id,
                c.eos_token_id, c.hidden_act) == (1e-5, 1e4, False, 1, 2, "silu")


def test_written_tensors_match_config(tmp_path):
    out = write_small(tmp_path / "m")
    config = transformers.AutoConfig.from_pretrained(out)
    written = written_tensors(out)
    assert {k: s for k, (s, _) in written.items()} == reference_shapes(config)
    assert {d for _, d in written.values()} == {"F16"}
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"
    assert raw["dtype"] == raw["torch_dtype"] == "float16"
    assert raw["pelatun_synthetic"]["kept"] == [0, 1]


def test_index_covers_every_tensor(tmp_path):
    out = write_small(tmp_path / "m")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total, seen = 0, {}
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
                seen[k] = shard
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total


def test_loads_with_transformers(tmp_path):
    out = write_small(tmp_path / "m")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float16
    with safe_open(out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"],
                   "pt") as f:
        assert torch.equal(model.lm_head.weight.detach(), f.get_tensor("lm_head.weight"))
    norm = model.model.norm.weight.float()
    assert (norm - 1).abs().max() < 0.2
    std = model.model.layers[0].mlp.up_proj.weight.float().std().item()
    assert 0.015 < std < 0.025
    logits = model.float()(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 1000) and torch.isfinite(logits).all()


def test_keep_first_last_70b_plan():
    config = ms.make_config("70b", keep_first=1, keep_last=1)
    assert config.num_hidden_layers == 2
    assert config.pelatun_synthetic == {"shape": "70b", "original_layers": 80, "kept": [0, 79], "seed": 0,
                                        "note": ms.NOTE}
    plan = ms.plan_tensors(config)
    assert plan == reference_shapes(config)
    assert sorted({n.split(".")[2] for n in plan if n.startswith("model.layers.")}) == ["0", "1"]
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(plan)
    assert ms.original_name("model.layers.1.mlp.up_proj.weight", [0, 79]) == "model.layers.79.mlp.up_proj.weight"
    shards, total = ms.plan_shards(plan, torch.float16, "2GB")
    assert total == 2 * 32000 * 8192 * 2 + 2 * 855_654_400 * 2 + 8192 * 2  # embed+lm_head, 2 blocks, norm
    assert len(shards) == 3


def test_kept_blocks_equal_the_full_models(tmp_path):
    four = {**SMALL, "num_hidden_layers": 4}  # a "full" model of 4 blocks
    a = write_small(tmp_path / "full", layers=None, config_overrides=four)
    b = write_small(tmp_path / "ends", layers=None, keep_first=1, keep_last=1, config_overrides=four)
    cb = json.loads((b / "config.json").read_text())
    assert cb["num_hidden_layers"] == 2 and cb["pelatun_synthetic"]["kept"] == [0, 3]
    wa, wb = pu.Weights(a), pu.Weights(b)
    for mine, theirs in [(0, 0), (1, 3)]:
        x = wb.read(wb.names(f"model.layers.{mine}."))
        y = wa.read(wa.names(f"model.layers.{theirs}."))
        assert all(torch.equal(v, y[k.replace(f"layers.{mine}.", f"layers.{theirs}.")]) for k, v in x.items())
    assert torch.equal(wa.read(["lm_head.weight"])["lm_head.weight"], wb.read(["lm_head.weight"])["lm_head.weight"])


def test_pelatun_reads_it(tmp_path, smollm2_dir, capsys):
    out = write_small(tmp_path / "m", tokenizer_from=smollm2_dir)
    assert "49152 tokens" in capsys.readouterr().err  # the vocab warning
    config = pu.read_config(out)
    weights = pu.Weights(out, config)
    block = weights.load_block(0, CPU, torch.float16)
    assert block.mlp.up_proj.weight.shape == (128, 64) and block.mlp.up_proj.weight.dtype == torch.float16
    y = pu.BlockRunner(config, CPU, torch.float32).run([(0, block.float())], torch.randn(1, 5, 64), None)
    assert y.shape == (1, 5, 64) and torch.isfinite(y).all()
    assert pu.model_dtype(weights) == torch.float16 and not weights.tied()
    assert weights.load_matrix("lm_head", CPU, torch.float16).shape == (1000, 64)
    assert pu.load_tokenizer(out) is not None


def test_refusals(tmp_path):
    with pytest.raises(ValueError):
        ms.make_config("7b", layers=2, keep_first=1)
    with pytest.raises(ValueError):
        ms.make_config("70b", keep_first=50, keep_last=31)
    with pytest.raises(ValueError):
        ms.make_config("13b")
    out = write_small(tmp_path / "m")
    with pytest.raises(FileExistsError):
        write_small(out)
    write_small(out, overwrite=True, layers=1)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
