"""Bad settings and bad numbers: clear errors, nothing on disk damaged."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pelatun_utils as pu
from helpers import build_cache, write_text

PARAMS = {"CONTEXT_LENGTH": int, "VAL_FRACTION": float, "DATA": str, "TRUST_REMOTE_CODE": bool}


def test_parameters_of_the_wrong_type():
    """A parameter of the wrong type is named with the expected type; ints pass for floats, bools not for ints."""
    good = {"CONTEXT_LENGTH": 512, "VAL_FRACTION": 0, "DATA": "x.txt", "TRUST_REMOTE_CODE": False}
    pu.check_parameters(good, PARAMS)
    for name, bad in [("CONTEXT_LENGTH", "512"), ("CONTEXT_LENGTH", 512.0), ("CONTEXT_LENGTH", True),
                      ("VAL_FRACTION", "0.1"), ("DATA", 3), ("TRUST_REMOTE_CODE", "yes")]:
        with pytest.raises(pu.PelatunError, match=f"Parameter {name}=.* should be a {PARAMS[name].__name__}"):
            pu.check_parameters({**good, name: bad}, PARAMS)


@pytest.mark.parametrize("n", [0, -1, 5, 100])
def test_train_layers_out_of_range(n):
    """TRAIN_LAYERS outside 1..num_layers names the range."""
    with pytest.raises(pu.PelatunError, match=f"TRAIN_LAYERS={n} is out of range.*use 1 to 4"):
        pu.check_train_layers(n, 4)
    assert pu.check_train_layers(1, 4) == 3


def test_unknown_dtype_refused():
    """DTYPE must be auto or a known dtype."""
    with pytest.raises(pu.PelatunError, match="DTYPE='fp8'"):
        pu.pick_compute_dtype("fp8", torch.device("cpu"), torch.float16)


def test_fp16_overflow_is_caught_per_block(tiny_model, tmp_path):
    """Hidden states that overflow fp16 stop the pass at that block with advice; the cache stays as it was."""
    model = tiny_model("llama", dtype=torch.float16)
    weights = pu.Weights(model)
    shard = model / weights.map["model.layers.1.mlp.down_proj.weight"]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"] * 1e6
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(pu.PelatunError, match="after layer 1 are inf/NaN in float16.*bfloat16 or float32"):
        build_cache(model, write_text(tmp_path / "d.txt"), tmp_path / "act", blocks_per_pass=2)
    cache = pu.Cache(tmp_path / "act", __import__("json").loads((tmp_path / "act" / "manifest.json").read_text()))
    assert cache.layer() == 0 and all(p["layer"] == 0 for _, p in cache.parts())
    assert pu.verify_cache(cache) == []  # every part still matches its checksum at layer 0


def test_plan_refuses_what_does_not_fit(tiny_model, tmp_path):
    """A memory budget below one block plus buffers is refused with the numbers and what to change."""
    model, data = tiny_model("llama"), write_text(tmp_path / "d.txt")
    cache, _, _ = build_cache(model, data, tmp_path / "act", train_layers=4)
    config = pu.read_config(model)
    with pytest.raises(pu.PelatunError, match="needs .* MEMORY_BUDGET is 1.0 KiB.*PASS_BATCH_TOKENS"):
        pu.plan_pass(cache, config, 3, torch.device("cpu"), torch.float32, torch.float32, batch_tokens=128,
                     part_tokens=256, memory_budget=1024)
    plan = pu.plan_pass(cache, config, 3, torch.device("cpu"), torch.float32, torch.float32, batch_tokens=128,
                        part_tokens=256, memory_budget=8 << 30)
    assert plan["blocks_per_pass"] == 3 and plan["keep_in_ram"] and plan["passes"] == 1
    # in RAM the blocks run one at a time: one block in memory, whatever the group
    assert plan["peak_memory_parts"]["blocks"] == pu.block_parameter_count(config) * 4
    assert plan["hidden_bytes_per_token_per_pass"] == 64 * 4  # written once, never read back (fp32 model)
    one = pu.plan_pass(cache, config, 3, torch.device("cpu"), torch.float32, torch.float32, batch_tokens=128,
                       part_tokens=256, memory_budget=8 << 30, blocks_per_pass=1)
    assert one["passes"] == 3 and one["hidden_bytes_written"] == 3 * cache.nbytes()
    plan["free_disk_bytes"] = 10
    with pytest.raises(pu.PelatunError, match="cache needs .* only 10 B is free"):
        pu.print_plan(plan)


def test_changed_tokenizer_or_compute_dtype_is_refused(tiny_model, tmp_path):
    """The cache names a different tokenizer, or compute dtype, as what differs."""
    model, data = tiny_model("llama"), write_text(tmp_path / "d.txt")
    build_cache(model, data, tmp_path / "act")
    with pytest.raises(pu.PelatunError, match="different compute_dtype"):
        build_cache(model, data, tmp_path / "act", dtype="bfloat16")
    config = model / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "pelatun_test": 1}', 1))
    with pytest.raises(pu.PelatunError, match="different tokenizer"):
        build_cache(model, data, tmp_path / "act")


def test_tensor_of_wrong_dtype_refused(tiny_model):
    """An integer tensor where a weight should be is refused, naming it."""
    model = tiny_model("llama")
    weights = pu.Weights(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = model / weights.map[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    before = shard.read_bytes()
    with pytest.raises(pu.PelatunError, match="self_attn.q_proj.weight has dtype torch.int32"):
        pu.Weights(model).load_block(0, torch.device("cpu"), torch.float32)
    assert shard.read_bytes() == before


def test_interrupted_export_is_redone(tiny_model, tmp_path):
    """A half-written OUTPUT_DIR.partial from a killed export is replaced by a complete export."""
    model = tiny_model("llama")
    weights = pu.Weights(model)
    top = pu.TopModel(weights, 3, torch.device("cpu"))
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "model-00001-of-00003.safetensors").write_bytes(b"torn")
    pu.export(top, weights, out, pu.load_tokenizer(model))
    assert not (tmp_path / "out.partial").exists()
    import transformers
    transformers.AutoModelForCausalLM.from_pretrained(out)
