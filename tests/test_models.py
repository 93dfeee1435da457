"""Models and weights: resolving MODEL, refusing bad checkpoints, reading blocks straight from the shards."""
import hashlib
import json
import re
import shutil

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import pelatun_utils as pu

CPU = torch.device("cpu")


def snapshot(root) -> dict:
    """Relative path -> sha256 of every file under root: to show that nothing on disk was touched."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def shard_of(model_dir, name: str) -> str:
    """The shard file holding a tensor, from the model's weight map."""
    return pu.weight_map(model_dir)[name]


def replace_tensor(path, name: str, tensor: torch.Tensor) -> None:
    """Rewrite one safetensors shard with one tensor replaced (other tensors and metadata kept)."""
    state = load_file(path)
    assert name in state
    state[name] = tensor
    save_file(state, path, metadata={"format": "pt"})


def block_params_on_meta(config) -> int:
    """The real parameter count of one decoder layer of the config's class, built on the meta device."""
    Cls = pu.layer_classes(config)[0]
    with torch.device("meta"):
        layer = Cls(config, layer_idx=0)
    return sum(p.numel() for p in layer.parameters())


# ----------------------------------------------------------------------------------------------
# resolve_model

def test_resolve_existing_local_dir(tiny_model, tmp_path):
    """An existing local directory is returned as is, and nothing is downloaded or written."""
    model_dir = tiny_model()
    before = snapshot(tmp_path)
    assert pu.resolve_model(str(model_dir), tmp_path / "models") == model_dir
    assert snapshot(tmp_path) == before and not (tmp_path / "models").exists()


def test_resolve_nonexistent_path_names_the_choices(tmp_path, monkeypatch):
    """A missing path that is no hub id is refused, naming the three kinds of MODEL."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pu.PelatunError, match=r"'\./no/such/dir/x'.*'smollm2-135m'.*local directory.*hub id"):
        pu.resolve_model("./no/such/dir/x", tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_resolve_hub_id_offline(tmp_path):
    """A hub id with no network gives a PelatunError pointing at the network and at a local directory."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE must be on (conftest sets it)"
    with pytest.raises(pu.PelatunError, match=r"Could not download 'someone/some-model'") as e:
        pu.resolve_model("someone/some-model", tmp_path / "models")
    assert "network" in str(e.value) and "local directory" in str(e.value)
    assert isinstance(e.value.__cause__, Exception)


def test_smollm2_conversion_failure_is_reported_and_leaves_nothing(tmp_path, monkeypatch):
    """The one-time conversion runs in a child process; its failure comes back as a PelatunError with the cause,
    and no half-written model directory is left behind."""
    bogus = tmp_path / "pkg" / pu.SMOLLM2_GGUF
    bogus.parent.mkdir()
    bogus.write_bytes(b"not a gguf file")
    monkeypatch.setattr(pu, "find_smollm2_gguf", lambda: bogus)
    with pytest.raises(pu.PelatunError, match="failed") as e:
        pu.resolve_model("smollm2-135m", tmp_path / "models")
    assert "Traceback" in str(e.value) or "Error" in str(e.value)
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


# ----------------------------------------------------------------------------------------------
# Refused checkpoints

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoint_refused_unread(name, tiny_model, tmp_path):
    """config.json + a pickle only: refused (pickle, safetensors), the pickle is neither loaded nor changed."""
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model() / "config.json", d / "config.json")
    (d / name).write_bytes(b"\x80\x04garbage: unpickling this would raise UnpicklingError, not PelatunError")
    before = snapshot(d)
    with pytest.raises(pu.PelatunError, match=rf"only pickle checkpoints \({re.escape(name)}\).*safetensors"):
        pu.weight_map(d)
    with pytest.raises(pu.PelatunError, match="pickle"):
        pu.Weights(d)
    assert snapshot(d) == before


def test_unsupported_architecture(tiny_model, tmp_path):
    """model_type gpt2 is refused, naming it and the supported architectures."""
    d = tiny_model()
    raw = json.loads((d / "config.json").read_text())
    raw["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(raw))
    before = snapshot(d)
    with pytest.raises(pu.PelatunError, match=r"Architecture 'gpt2' .* not supported; PeLaTun runs llama, mistral, qwen2"):
        pu.read_config(d)
    assert snapshot(d) == before


def test_remote_code_refused(tiny_model):
    """A config with auto_map is refused unless TRUST_REMOTE_CODE, which the message names."""
    d = tiny_model()
    raw = json.loads((d / "config.json").read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(raw))
    before = snapshot(d)
    with pytest.raises(pu.PelatunError, match=r"remote code.*auto_map.*TRUST_REMOTE_CODE = True"):
        pu.read_config(d)
    with pytest.raises(pu.PelatunError, match="TRUST_REMOTE_CODE"):
        pu.Weights(d)
    assert snapshot(d) == before


def test_missing_config_refused(tiny_model):
    """A directory without config.json is refused."""
    d = tiny_model()
    (d / "config.json").unlink()
    before = snapshot(d)
    with pytest.raises(pu.PelatunError, match=r"has no config\.json"):
        pu.read_config(d)
    with pytest.raises(pu.PelatunError, match=r"has no config\.json"):
        pu.Weights(d)
    assert snapshot(d) == before


def test_no_weights_at_all_refused(tiny_model, tmp_path):
    """config.json alone (no safetensors, no pickle) is refused."""
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(tiny_model() / "config.json", d / "config.json")
    with pytest.raises(pu.PelatunError, match=r"no model\.safetensors nor model\.safetensors\.index\.json"):
        pu.weight_map(d)


def test_index_names_missing_shard(tiny_model):
    """Deleting a shard that the index names: weight_map (and Weights) refuse, naming that file."""
    d = tiny_model()
    shard = shard_of(d, "model.layers.1.mlp.up_proj.weight")
    (d / shard).unlink()
    before = snapshot(d)
    with pytest.raises(pu.PelatunError, match=rf"missing: {re.escape(shard)}\."):
        pu.weight_map(d)
    with pytest.raises(pu.PelatunError, match=re.escape(shard)):
        pu.Weights(d)
    assert snapshot(d) == before


def test_truncated_shard(tiny_model):
    """A shard cut to half: reading a block from it says damaged/truncated; other shards still read."""
    d = tiny_model()
    w = pu.Weights(d)
    i = 1
    shard = w.map[f"model.layers.{i}.self_attn.q_proj.weight"]
    assert w.map["model.embed_tokens.weight"] != shard  # the embedding lives elsewhere
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[:len(data) // 2])
    before = snapshot(d)
    with pytest.raises(pu.PelatunError, match=rf"Could not read {re.escape(shard)} .*damaged or truncated"):
        pu.Weights(d).load_block(i, CPU, torch.float32)
    assert pu.Weights(d).load_matrix("embed", CPU, torch.float32).shape == (49152, 64)
    assert snapshot(d) == before


def test_block_tensor_of_wrong_shape(tiny_model):
    """One block tensor of another shape: load_block names the tensor and its shape; other blocks load."""
    d = tiny_model()
    name = "model.layers.2.mlp.down_proj.weight"
    replace_tensor(d / shard_of(d, name), name, torch.zeros(64, 64))
    before = snapshot(d)
    w = pu.Weights(d)
    with pytest.raises(pu.PelatunError, match=rf"Tensor {re.escape(name)} has shape \(64, 64\), config\.json "
                                              rf"implies \(64, 128\)"):
        w.load_block(2, CPU, torch.float32)
    w.load_block(1, CPU, torch.float32)
    assert snapshot(d) == before


def test_block_tensor_same_numel_other_shape(tiny_model):
    """A transposed-like reshape (same element count) is still refused by shape."""
    d = tiny_model("qwen2")
    name = "model.layers.0.mlp.gate_proj.weight"  # [128, 64]
    replace_tensor(d / shard_of(d, name), name, torch.zeros(64, 128))
    with pytest.raises(pu.PelatunError, match=rf"{re.escape(name)} has shape \(64, 128\)"):
        pu.Weights(d).load_block(0, CPU, torch.float32)


def test_embedding_of_wrong_shape(tiny_model):
    """An embedding of the wrong shape: load_matrix('embed') (and a tied lm_head) refuse it."""
    d = tiny_model(tied=True)
    name = "model.embed_tokens.weight"
    replace_tensor(d / shard_of(d, name), name, torch.zeros(100, 64))
    before = snapshot(d)
    w = pu.Weights(d)
    with pytest.raises(pu.PelatunError, match=r"model\.embed_tokens\.weight has shape \(100, 64\) but config"
                                              r"\.json says \(49152, 64\)"):
        w.load_matrix("embed", CPU, torch.float32)
    with pytest.raises(pu.PelatunError, match="shape"):
        w.load_matrix("lm_head", CPU, torch.float32)
    assert snapshot(d) == before


# ----------------------------------------------------------------------------------------------
# Reading the weights

def test_single_file_model(tiny_model):
    """model.safetensors without index: the map covers every tensor and blocks match transformers' model."""
    d = tiny_model(single_file=True, name="single")
    assert not (d / "model.safetensors.index.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    wmap = pu.weight_map(d)
    assert set(wmap) == set(load_file(d / "model.safetensors")) == set(model.state_dict())
    assert set(wmap.values()) == {"model.safetensors"}
    w = pu.Weights(d)
    ref = model.model.layers[1].state_dict()
    got = w.load_block(1, CPU, torch.float32).state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert not torch.equal(got["mlp.up_proj.weight"], model.model.layers[2].state_dict()["mlp.up_proj.weight"])
    assert torch.equal(w.load_matrix("embed", CPU, torch.float32), model.model.embed_tokens.weight)
    assert torch.equal(w.load_matrix("lm_head", CPU, torch.float32), model.lm_head.weight)
    assert torch.equal(w.load_norm(CPU, torch.float32).weight, model.model.norm.weight)


def test_sharded_blocks_match_transformers(tiny_model):
    """Sharded bf16 model: every block read from the shards equals transformers' own layer."""
    d = tiny_model("mistral", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    w = pu.Weights(d)
    assert pu.model_dtype(w) == torch.bfloat16
    for i in range(4):
        got = w.load_block(i, CPU, torch.bfloat16).state_dict()
        for k, v in model.model.layers[i].state_dict().items():
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), (i, k)


# ----------------------------------------------------------------------------------------------
# Fingerprints and tied embeddings

def test_fingerprint_stable(tiny_model, tmp_path):
    """Same dir read twice (and a byte-identical copy) -> same fingerprint; nothing written."""
    d = tiny_model()
    before = snapshot(d)
    fp = pu.fingerprint_model(d)
    assert fp == pu.fingerprint_model(d)
    assert set(fp["shards"]) == set(pu.weight_map(d).values())
    shutil.copytree(d, tmp_path / "copy")
    assert pu.fingerprint_model(tmp_path / "copy") == fp
    assert snapshot(d) == before


def test_fingerprint_other_seed(tiny_model):
    """Another seed (same config, same names and shapes) -> another fingerprint."""
    a = pu.fingerprint_model(tiny_model())
    b = pu.fingerprint_model(tiny_model(seed=1, name="other"))
    assert a["config_sha256"] == b["config_sha256"]
    assert a != b


def test_fingerprint_config_change(tiny_model):
    """Changing config.json (weights untouched) changes the fingerprint."""
    d = tiny_model()
    a = pu.fingerprint_model(d)
    raw = json.loads((d / "config.json").read_text())
    raw["rope_theta"] = 500000.0
    (d / "config.json").write_text(json.dumps(raw, indent=2))
    b = pu.fingerprint_model(d)
    assert a["config_sha256"] != b["config_sha256"] and a["shards"] == b["shards"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tied_embeddings(arch, tiny_model):
    """tied() is True only for a tied model; a tied lm_head is the embedding, an untied one is its own."""
    tied, untied = tiny_model(arch, tied=True), tiny_model(arch, tied=False)
    wt, wu = pu.Weights(tied), pu.Weights(untied)
    assert wt.tied() is True and wu.tied() is False
    emb = wt.load_matrix("embed", CPU, torch.float32)
    assert torch.equal(wt.load_matrix("lm_head", CPU, torch.float32), emb)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
    assert torch.equal(ref.lm_head.weight, emb)
    head = wu.load_matrix("lm_head", CPU, torch.float32)
    assert head.shape == emb.shape and not torch.equal(head, wu.load_matrix("embed", CPU, torch.float32))


# ----------------------------------------------------------------------------------------------
# block_parameter_count

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_block_parameter_count_tiny(arch, tiny_model):
    """block_parameter_count == the real decoder layer's parameter count (GQA; qwen2 with qkv bias)."""
    config = pu.read_config(tiny_model(arch))
    assert pu.block_parameter_count(config) == block_params_on_meta(config)


def test_block_parameter_count_llama2_7b():
    """The exact Llama-2-7B config: the count matches the meta-device layer (202,383,360)."""
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                      num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000)
    n = block_params_on_meta(config)
    assert n == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096 == 202_383_360
    assert pu.block_parameter_count(config) == n


@pytest.mark.parametrize("make", [
    lambda: transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=32),
    lambda: transformers.Qwen2Config(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                     num_key_value_heads=2),
], ids=["mistral-explicit-head_dim", "qwen2-0.5b"])
def test_block_parameter_count_other_shapes(make):
    """An explicit head_dim != hidden/heads, and Qwen2-0.5B's shapes, are counted exactly."""
    config = make()
    assert pu.block_parameter_count(config) == block_params_on_meta(config)


@pytest.mark.parametrize("bias", [{"attention_bias": True}, {"mlp_bias": True}], ids=["attention_bias", "mlp_bias"])
def test_block_parameter_count_llama_biases(bias):
    """Llama with attention_bias / mlp_bias: the count should include every bias of the real layer."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, **bias)
    assert pu.block_parameter_count(config) == block_params_on_meta(config)
