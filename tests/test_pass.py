"""The peristaltic pass: the cache holds exactly what transformers' full forward computes."""
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import pelatun_utils as pu
from helpers import build_cache, write_text


def reference_hidden(model_dir, cache, layer: int, batch_tokens: int, dtype=torch.float32) -> dict:
    """Full-model hidden_states[layer] per split, on the same padded batches the pass used."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    out = {}
    for split in cache.manifest["splits"]:
        tokens = np.array(cache.array(split, "tokens"), dtype=np.int64)
        off = cache.offsets(split)
        rows = [None] * (len(off) - 1)
        for part in cache.manifest["splits"][split]["parts"]:
            s0, s1 = part["samples"]
            ids = [torch.from_numpy(tokens[off[i]:off[i + 1]]) for i in range(s0, s1)]
            for batch in pu.make_batches([len(x) for x in ids], batch_tokens):
                x, mask = pu.pad_batch([ids[i] for i in batch])
                with torch.no_grad():
                    hs = model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
                for j, i in enumerate(batch):
                    rows[s0 + i] = hs[j, :len(ids[i])].float().numpy()
        out[split] = rows
    return out


def cached_hidden(cache, split):
    return [h for _, _, h in pu.read_activations(cache.dir, split)]


@pytest.mark.parametrize("arch,blocks_per_pass,keep_in_ram", [("llama", 1, False), ("mistral", 1, False),
                                                                ("qwen2", 1, False), ("llama", 2, False),
                                                                ("llama", 3, True)])
def test_float32_cache_is_bitwise_the_full_forward(arch, blocks_per_pass, keep_in_ram, tiny_model, tmp_path):
    """fp32: cached hidden states == transformers' output_hidden_states[L - TRAIN_LAYERS], bit for bit."""
    model_dir = tiny_model(arch)
    data = write_text(tmp_path / "d.txt")
    for train_layers in (1, 2):
        cache, stats, _ = build_cache(model_dir, data, tmp_path / f"act{train_layers}", train_layers=train_layers,
                                      val_fraction=0.2, batch_tokens=96, blocks_per_pass=blocks_per_pass,
                                      keep_in_ram=keep_in_ram)
        assert stats.blocks_run == 4 - train_layers
        # in RAM the blocks run one at a time (the group sets when the disk copy is written)
        assert stats.max_live_blocks == (1 if keep_in_ram else min(blocks_per_pass, 4 - train_layers))
        ref = reference_hidden(model_dir, cache, 4 - train_layers, 96)
        for split in ("train", "val"):
            got = cached_hidden(cache, split)
            assert len(got) == len(ref[split]) > 0
            for g, r in zip(got, ref[split]):
                assert g.shape == r.shape
                assert np.array_equal(g, r), f"{arch}: max abs diff {np.abs(g - r).max()}"


def test_pack_rows_places_every_sample_once():
    """Rows hold samples longest first up to the longest sample's length; batches stay under batch_tokens."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=300).tolist()
    batches = pu.pack_rows(lengths, batch_tokens=400)
    rows = [row for batch in batches for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    assert all(len(batch) * max(lengths) <= 400 for batch in batches)
    packed = len(rows) * max(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in pu.make_batches(lengths, 400))
    assert packed < min(padded, 1.05 * sum(lengths))
    assert pu.pack_rows([70], 16) == [[[0]]]  # a sample longer than a batch still runs, alone


def test_row_width_packs_short_samples(smollm2_dir):
    """Rows widen past the longest sample only when that leaves fewer slots empty: samples a little over half the
    longest fill a row of twice its length, not one of its own length."""
    config = pu.read_config(smollm2_dir)
    assert pu.row_width(config, [100] * 20, 8192) == 100  # equal lengths: nothing to pack
    assert pu.row_width(config, [100] + [10] * 60, 8192) == 100  # short ones pack into rows of 100 already
    lengths = [100] + [60] * 40
    width = pu.row_width(config, lengths, 8192)
    assert width > 100 and sum(len(b) for b in pu.pack_rows(lengths, 8192, width)) * width < 0.8 * 41 * 100
    assert pu.row_width(config, [4096, 100], 2048) == 4096  # never narrower than the longest sample


@pytest.mark.parametrize("arch,config", [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen2", {})])
def test_packed_rows_of_mixed_lengths_match(arch, config, tiny_model, tmp_path):
    """Chat samples of different lengths are packed several to a row; results are still bitwise the full forward
    of each sample's own padded batch (a sliding window counts from each sample's own start)."""
    model_dir = tiny_model(arch, config=config, name=arch)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "Count to " + str(i)},
        {"role": "assistant", "content": " ".join(str(k) for k in range(i))}]}) + "\n" for i in [*range(1, 13), 32]))
    cache, stats, splits = build_cache(model_dir, data, tmp_path / "act", context_length=128, batch_tokens=400)
    lengths = [len(s.ids) for s in splits["train"]]
    assert len(set(lengths)) > 3 and cache.manifest["splits"]["train"]["n_tokens"] == sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in pu.make_batches(lengths, 400))
    assert stats.token_slots < 0.9 * padded * 3  # packing computed fewer slots than padding would
    ref = reference_hidden(model_dir, cache, 3, 400)
    for g, r in zip(cached_hidden(cache, "train"), ref["train"]):
        assert np.array_equal(g, r), f"max abs diff {np.abs(g - r).max()}"


# 16-bit storage rounds each block's output once: the error grows with depth, relative to the state's size.
TOLERANCE_16BIT = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # max |cache - ref| / max |ref|, per sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_cache_within_rounding(dtype, tiny_model, tmp_path):
    """A 16-bit model's cache is stored in its dtype and stays within the stated rounding tolerance."""
    model_dir = tiny_model("llama", dtype=dtype)
    cache, _, _ = build_cache(model_dir, write_text(tmp_path / "d.txt"), tmp_path / "act")
    assert cache.dtype == dtype
    assert (cache.dir / "train" / "hidden.bin").stat().st_size == cache.manifest["splits"]["train"]["n_tokens"] * 64 * 2
    ref = reference_hidden(model_dir, cache, 3, 128, dtype=torch.float32)
    for g, r in zip(cached_hidden(cache, "train"), ref["train"]):
        assert np.abs(g - r).max() / np.abs(r).max() < TOLERANCE_16BIT[dtype]


def test_grouping_does_not_change_16bit_numbers(tiny_model, tmp_path):
    """Rounding after every block makes a bf16 cache identical whatever the blocks per pass or RAM mode."""
    model_dir, data = tiny_model("llama", dtype=torch.bfloat16, layers=5), write_text(tmp_path / "d.txt")
    runs = [build_cache(model_dir, data, tmp_path / f"a{g}{ram}", blocks_per_pass=g, keep_in_ram=ram)[0]
            for g, ram in [(1, False), (2, False), (4, True)]]
    assert len({c.digest() for c in runs}) == 1
    first = cached_hidden(runs[0], "train")
    for c in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(first, cached_hidden(c, "train")))


def test_bytes_moved_are_counted(tiny_model, tmp_path):
    """Hidden-state bytes read and written per pass: 2 x tokens x hidden x itemsize per group (disk mode)."""
    model_dir, data = tiny_model("llama", dtype=torch.float16, layers=5), write_text(tmp_path / "d.txt")
    per_pass = None
    for g, ram in [(1, False), (2, False), (4, True)]:
        cache, stats, _ = build_cache(model_dir, data, tmp_path / f"a{g}{ram}", blocks_per_pass=g, keep_in_ram=ram)
        per_pass = cache.nbytes()
        passes = -(-4 // g)
        assert stats.groups == [[i, min(i + g, 4)] for i in range(0, 4, g)]
        assert stats.hidden_bytes_written == passes * per_pass
        assert stats.hidden_bytes_read == (0 if ram else passes * per_pass)


def test_smollm2_cache_matches_full_model(smollm2_dir, tmp_path):
    """The real SmolLM2-135M on a few samples of the default data: bf16 cache vs the fp32 full forward."""
    data = pu.build_default_data(tmp_path / "stdlib_chat.jsonl")
    cache, stats, _ = build_cache(smollm2_dir, data, tmp_path / "act", context_length=512, batch_tokens=2048,
                                  max_samples=6)
    assert stats.blocks_run == 29 and stats.max_live_blocks == 1 and cache.dtype == torch.bfloat16
    ref = reference_hidden(smollm2_dir, cache, 29, 2048)
    for g, r in zip(cached_hidden(cache, "train"), ref["train"]):
        assert np.abs(g - r).max() / np.abs(r).max() < TOLERANCE_16BIT[torch.bfloat16]
        cos = (g * r).sum(-1) / np.linalg.norm(g, axis=-1) / np.linalg.norm(r, axis=-1)
        assert cos.min() > 0.999


def test_one_block_in_memory(tiny_model, tmp_path, monkeypatch):
    """During the loop each read touches one block (or the embedding), and at most one block is alive."""
    model_dir = tiny_model("llama", layers=5)
    reads, live = [], []
    real_read, real_run = pu.Weights.read, pu.BlockRunner.run

    def read(self, names):
        reads.append({n.split(".")[2] if n.startswith("model.layers.") else n for n in names})
        return real_read(self, names)

    def run(self, blocks, x, mask, **kw):
        gc.collect()
        live.append(len(pu.LIVE_BLOCKS))
        params = sum(p.numel() for b in pu.LIVE_BLOCKS for p in b.parameters())
        assert params <= pu.block_parameter_count(self.config)
        return real_run(self, blocks, x, mask, **kw)

    monkeypatch.setattr(pu.Weights, "read", read)
    monkeypatch.setattr(pu.BlockRunner, "run", run)
    build_cache(model_dir, write_text(tmp_path / "d.txt"), tmp_path / "act", train_layers=1)
    assert reads[0] == {"model.embed_tokens.weight"}
    assert [r for r in reads[1:]] == [{str(i)} for i in range(4)]
    assert live and max(live) == 1


@pytest.mark.parametrize("keep_in_ram", [False, True])
def test_blocks_are_converted_into_the_last_blocks_memory(keep_in_ram, tiny_model, tmp_path, monkeypatch):
    """An fp16 model run in fp32: each block after the first is converted into the tensors of the block before
    (no fresh memory), and its weights are still its own."""
    model_dir = tiny_model("llama", dtype=torch.float16, layers=5)
    seen = []
    real_run = pu.BlockRunner.run

    def run(self, blocks, x, mask, **kw):
        for i, b in blocks:
            seen.append((i, b.mlp.up_proj.weight.data_ptr(), b.mlp.up_proj.weight.detach().clone()))
        return real_run(self, blocks, x, mask, **kw)

    monkeypatch.setattr(pu.BlockRunner, "run", run)
    build_cache(model_dir, write_text(tmp_path / "d.txt"), tmp_path / "act", keep_in_ram=keep_in_ram,
                blocks_per_pass=1 if not keep_in_ram else 4)
    assert sorted({i for i, _, _ in seen}) == [0, 1, 2, 3]
    assert len({ptr for _, ptr, _ in seen}) == 1  # one buffer, refilled block after block
    weights = pu.Weights(model_dir, pu.read_config(model_dir))
    for i, _, w in seen:
        assert torch.equal(w, weights.block_state(i)["mlp.up_proj.weight"].float())


def test_same_settings_reuse_the_cache(tiny_model, tmp_path):
    """A second run with the same model, data and settings runs no block."""
    model_dir, data = tiny_model("llama"), write_text(tmp_path / "d.txt")
    build_cache(model_dir, data, tmp_path / "act")
    _, stats, _ = build_cache(model_dir, data, tmp_path / "act")
    assert stats.blocks_run == 0


def test_stale_cache_is_refused(tiny_model, tmp_path):
    """A cache made for other data, settings or model is refused, naming what differs; files untouched."""
    model_dir, data = tiny_model("llama"), write_text(tmp_path / "d.txt")
    cache, _, _ = build_cache(model_dir, data, tmp_path / "act")
    before = {p.name: p.read_bytes() for p in cache.dir.rglob("*") if p.is_file()}
    write_text(data, n=41)
    with pytest.raises(pu.PelatunError, match="different dataset.*delete"):
        build_cache(model_dir, data, tmp_path / "act")
    write_text(data, n=40)
    with pytest.raises(pu.PelatunError, match="different context_length"):
        build_cache(model_dir, data, tmp_path / "act", context_length=48)
    with pytest.raises(pu.PelatunError, match="different model"):
        build_cache(tiny_model("llama", seed=1, name="other", layers=4), data, tmp_path / "act")
    with pytest.raises(pu.PelatunError, match="after layer 3.*TRAIN_LAYERS"):
        build_cache(model_dir, data, tmp_path / "act", train_layers=2)
    assert before == {p.name: p.read_bytes() for p in cache.dir.rglob("*") if p.is_file()}


def test_lower_cache_is_advanced(tiny_model, tmp_path):
    """A cache stopped below the new target is advanced from where it stopped, to the same numbers."""
    model_dir, data = tiny_model("llama"), write_text(tmp_path / "d.txt")
    build_cache(model_dir, data, tmp_path / "a", train_layers=3)
    cache, stats, _ = build_cache(model_dir, data, tmp_path / "a", train_layers=1)
    assert stats.blocks_run == 2
    fresh, _, _ = build_cache(model_dir, data, tmp_path / "b", train_layers=1)
    for g, r in zip(cached_hidden(cache, "train"), cached_hidden(fresh, "train")):
        assert np.array_equal(g, r)


def test_read_activations_layout(tiny_model, tmp_path):
    """read_activations yields (ids, labels, hidden) per sample in dataset order, HF-aligned labels."""
    model_dir = tiny_model("llama")
    cache, _, splits = build_cache(model_dir, write_text(tmp_path / "d.txt"), tmp_path / "act", val_fraction=0.25)
    for split in ("train", "val"):
        got = list(pu.read_activations(cache.dir, split))
        assert len(got) == len(splits[split])
        for (ids, labels, hidden), s in zip(got, splits[split]):
            assert ids.tolist() == s.ids and labels.tolist() == s.labels
            assert hidden.shape == (len(s.ids), 64) and hidden.dtype == np.float32
    with pytest.raises(pu.PelatunError, match="no split 'test'"):
        next(pu.read_activations(cache.dir, "test"))


def test_pass_memory_is_the_larger_moment(tiny_model):
    """The pass's predicted peak is loading a group or running a batch, whichever is larger, not their sum."""
    config = pu.read_config(tiny_model("llama"))
    cpu = torch.device("cpu")
    block = pu.block_parameter_count(config)
    args = dict(part_bytes=1000, ram_bytes=0, baseline=0)
    # converting fp16 weights to fp32, tiny batch: loading peaks (2-byte raw + 4-byte converted group)
    m = pu.pass_memory(config, 2, False, cpu, torch.float32, torch.float16, batch_tokens=1, **args)
    assert m["moment"] == "loading a group" and m["total"] == 2 * block * (4 + 2)
    # a big batch: running peaks, and the raw group is gone by then
    m = pu.pass_memory(config, 2, False, cpu, torch.float32, torch.float16, batch_tokens=4096, **args)
    assert m["moment"] == "running a batch" and "raw group being converted" not in m["parts"]
    assert m["total"] == 2 * block * 4 + m["parts"]["batch activations"] + 6 * 1000
    # computing in the stored dtype on a CPU converts nothing: no second copy while loading
    m = pu.pass_memory(config, 2, False, cpu, torch.float32, torch.float32, batch_tokens=1, **args)
    assert m["total"] == max(2 * block * 4, 2 * block * 4 + m["parts"].get("batch activations", 0) + 6000)


HEAP_CHECK = r"""
import json, sys, torch
import pelatun_utils as pu
mib = 1 << 20
pu.keep_freed_memory(1024 * mib)  # keep everything freed: no trim, nothing mapped apart
cap = pu.HeapCap(64 * mib)
quiet = cap.check()
keep, big = [], []
for _ in range(48):  # 8 MiB blocks with a small long-lived tensor after each: the freed blocks cannot be trimmed
    big.append(torch.ones(2 * mib))
    keep.append(torch.ones(16 * 1024))
del big
held = pu.heap_unused_bytes() - cap.floor
trimmed = cap.check()
print(json.dumps({"quiet": quiet, "held": held, "trimmed": trimmed, "after": pu.heap_unused_bytes() - cap.floor}))
"""


def test_heap_cap_gives_back_freed_memory_past_its_limit():
    """Freed memory pinned under long-lived tensors stays resident; HeapCap gives it back once it outgrows the limit
    (in a subprocess: malloc settings are per process)."""
    if not (pu.glibc() and hasattr(pu.glibc(), "mallinfo2")):
        pytest.skip("needs Linux with glibc 2.33+ (mallinfo2)")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True, cwd=root, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert not out["quiet"]  # nothing freed yet: nothing to give back
    assert out["held"] > 300 * mib  # 48 x 8 MiB freed, still resident
    assert out["trimmed"] and out["after"] < 64 * mib


def test_mask_arguments_follow_each_transformers_signature():
    """create_causal_mask's argument names changed within transformers 5.x; the pass names them as each version does
    (the pass tests passed by hand against 5.0, 5.5, 5.17 and 5.25)."""
    def v5_0(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
        pass

    def v5_17(config, inputs_embeds, attention_mask, past_key_values, position_ids=None):
        pass

    def v5_25(config, inputs_embeds, attention_mask, cache, position_ids=None, *, past_key_values=None):
        pass

    x, pos = torch.zeros(2, 5, 8), torch.arange(5).unsqueeze(0)
    for fn in (v5_0, v5_17, v5_25):
        kw = pu.mask_arguments(fn, "config", x, None, pos)
        fn(**kw)  # every required argument given, none unknown
        assert kw["position_ids"] is pos and kw.get("inputs_embeds", kw.get("input_embeds")) is x
    assert pu.mask_arguments(v5_0, "config", x, None, pos)["cache_position"].tolist() == [0, 1, 2, 3, 4]
    assert "cache" in pu.mask_arguments(v5_25, "config", x, None, pos)
