"""Training the top block(s) on the cache, evaluation, and the export that transformers loads."""
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import pelatun_utils as pu
from helpers import CPU, build_cache, write_text

CTX = 32


def train_and_export(model_dir, data, tmp_path, train_layers, steps_epochs=2):
    """Pass, train a little, export; returns (cache, top, out_dir, history)."""
    cache, _, _ = build_cache(model_dir, data, tmp_path / "act", train_layers=train_layers, context_length=CTX,
                              batch_tokens=CTX, val_fraction=0.25)  # one sample per batch, as generate() sees it
    weights = pu.Weights(model_dir)
    top = pu.TopModel(weights, weights.config.num_hidden_layers - train_layers, CPU)
    history = pu.train(top, cache, epochs=steps_epochs, lr=1e-3, batch_tokens=4 * CTX, weight_decay=0.01,
                       warmup_steps=2, seed=0, device=CPU, dtype=torch.float32, eval_every=3)
    out = tmp_path / "out"
    pu.export(top, weights, out, pu.load_tokenizer(model_dir))
    return cache, top, out, history


@pytest.mark.parametrize("train_layers,tied", [(1, False), (2, False), (1, True), (2, True)])
def test_exported_model_matches_training_module(train_layers, tied, tiny_model, tmp_path):
    """from_pretrained(OUTPUT_DIR) gives, bit for bit in fp32, the logits the trained module gives on the cache."""
    model_dir = tiny_model("llama", tied=tied)
    cache, top, out, history = train_and_export(model_dir, write_text(tmp_path / "d.txt"), tmp_path, train_layers)
    assert len(history["train_loss"]) > 2 and history["val_loss"]
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.tie_word_embeddings is False
    top.eval()
    for ids, labels, hidden in pu.read_activations(cache.dir, "val"):
        with torch.no_grad():
            want = top(torch.from_numpy(hidden)[None])
            got = exported(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits
        assert torch.equal(got, want)


def test_export_changes_only_trained_tensors(tiny_model, tmp_path):
    """trained.safetensors holds the trained tensors under their names; every other tensor is unchanged."""
    model_dir = tiny_model("llama", tied=True, layers=4)
    _, top, out, _ = train_and_export(model_dir, write_text(tmp_path / "d.txt"), tmp_path, 1)
    with safe_open(out / "trained.safetensors", "pt") as f:
        trained = set(f.keys())
    assert trained == {n for n in pu.Weights(model_dir).map if n.startswith("model.layers.3.")} | {
        "model.norm.weight", "lm_head.weight"}
    src, dst = pu.Weights(model_dir), pu.Weights(out)
    for name in src.map:
        a, b = src.read([name])[name], dst.read([name])[name]
        assert torch.equal(a, b) != (name in trained), name
    assert not torch.equal(dst.read(["lm_head.weight"])["lm_head.weight"], src.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"])
    untouched = [s for s in set(src.map.values()) if not any(src.map.get(n) == s for n in trained)]
    assert untouched and all((out / s).read_bytes() == (model_dir / s).read_bytes() for s in untouched)


def test_export_of_single_file_model(tiny_model, tmp_path):
    """A one-file model (no index) exports as one file, with its untied lm_head inside."""
    model_dir = tiny_model("qwen2", tied=True, single_file=True)
    cache, top, out, _ = train_and_export(model_dir, write_text(tmp_path / "d.txt"), tmp_path, 1)
    assert not (out / "model.safetensors.index.json").exists()
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, _, hidden = next(pu.read_activations(cache.dir, "val"))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits,
                           top.eval()(torch.from_numpy(hidden)[None]))


def test_untrained_top_gives_the_full_model_loss(tiny_model, tmp_path):
    """Held-out loss from the cache before training equals transformers' own loss on the same samples."""
    model_dir = tiny_model("mistral")
    cache, _, _ = build_cache(model_dir, write_text(tmp_path / "d.txt"), tmp_path / "act", context_length=CTX,
                              batch_tokens=CTX, val_fraction=0.25)
    top = pu.TopModel(pu.Weights(model_dir), 3, CPU)
    ours = pu.evaluate(top, cache, "val", CPU, torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ids, labels, _ in pu.read_activations(cache.dir, "val"):
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None],
                        labels=torch.from_numpy(labels.astype(np.int64))[None])
        n = int((labels[1:] != -100).sum())
        total, count = total + out.loss.item() * n, count + n
    assert ours == pytest.approx(total / count, rel=1e-5)


def test_masked_labels_are_not_trained(tiny_model, tmp_path):
    """Tokens with label -100 contribute nothing: the loss counts only target tokens."""
    logits = torch.randn(1, 6, 10)
    labels = torch.tensor([[1, 2, -100, -100, 5, 6]])
    loss, n = pu.causal_lm_loss(logits, labels)
    assert n == 3  # predicted: labels[1], labels[4], labels[5]
    want = sum(torch.nn.functional.cross_entropy(logits[0, t - 1:t], labels[0, t:t + 1]) for t in (1, 4, 5))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_training_lowers_training_loss(tiny_model, tmp_path):
    """A few epochs on a small repeated text lower the training loss."""
    model_dir = tiny_model("llama")
    _, _, _, history = train_and_export(model_dir, write_text(tmp_path / "d.txt"), tmp_path, 1, steps_epochs=4)
    k = len(history["train_loss"]) // 4
    assert np.mean(history["train_loss"][-k:]) < np.mean(history["train_loss"][:k])


def test_metrics_json_written(tmp_path):
    """write_metrics writes metrics.json atomically."""
    path = pu.write_metrics(tmp_path / "o", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and not list((tmp_path / "o").glob("*.tmp"))
