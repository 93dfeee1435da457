"""The lean training step: chunked loss, SDPA without T x T, checkpointing, optimizers, and the memory planner."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import pelatun_utils as pu
from conftest import REPO, make_tiny_model
from helpers import CPU, build_cache, write_text

CTX = 32


def masked_labels(B: int, T: int, V: int) -> torch.Tensor:
    """Random labels [B, T] with a masked prompt, a masked gap and one fully masked row."""
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[0, 7:11] = -100
    labels[-1] = -100
    return labels


def saved_tensors(fn) -> list[torch.Tensor]:
    """Run fn() and return every tensor autograd saved for backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        out = fn()
    return saved, out


def non_parameters(tensors: list[torch.Tensor], module_or_params) -> list[torch.Tensor]:
    """The tensors that are not (views of) the given parameters."""
    params = module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module) else module_or_params
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    return [t for t in tensors if t.untyped_storage().data_ptr() not in ptrs]


# ----------------------------------------------------------------------------------------------
# 1. Chunked loss


@pytest.mark.parametrize("chunk", [1, 5, 7, 24, 100])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
    """Same loss, target count and gradients (hidden, weight) as causal_lm_loss(lm_head(hidden)), masks included."""
    torch.manual_seed(0)
    B, T, H, V = 3, 13, 16, 50  # 3 x 12 = 36 predicted positions: 5, 7 and 24 do not divide them
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = masked_labels(B, T, V)
    want, n_want = pu.causal_lm_loss(torch.nn.functional.linear(hidden, weight), labels)
    want_h, want_w = torch.autograd.grad(want, (hidden, weight))
    got, n = pu.chunked_lm_loss(hidden, weight, labels, chunk)
    got_h, got_w = torch.autograd.grad(got, (hidden, weight))
    assert n == n_want == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, want_h)
    torch.testing.assert_close(got_w, want_w)


def test_chunked_loss_refuses_a_bad_chunk():
    with pytest.raises(pu.PelatunError, match="LOSS_CHUNK_TOKENS"):
        pu.chunked_lm_loss(torch.randn(1, 4, 2), torch.randn(3, 2), torch.zeros(1, 4, dtype=torch.long), 0)


def test_chunked_loss_keeps_no_logits_for_backward():
    """Plain: a [tokens, vocab] float32 tensor is saved for backward. Chunked: nothing of even one chunk's logits."""
    torch.manual_seed(0)
    T, H, V, chunk = 512, 32, 4000, 64
    hidden = torch.randn(1, T, H, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(V, H))
    labels = masked_labels(1, T, V)
    plain, _ = saved_tensors(lambda: pu.causal_lm_loss(torch.nn.functional.linear(hidden, weight), labels))
    chunked, _ = saved_tensors(lambda: pu.chunked_lm_loss(hidden, weight, labels, chunk))
    largest = lambda ts: max(t.numel() for t in non_parameters(ts, [weight]))
    assert largest(plain) >= (T - 1) * V
    assert largest(chunked) <= chunk * H  # a chunk of hidden states (a view); the logits are recomputed


def test_chunked_loss_lowers_peak_memory():
    """Measured peak RSS (VmHWM) of forward + backward: the chunked loss needs a fraction of the plain loss's."""
    if not pu.return_freed_memory():  # RSS then follows the live tensors
        pytest.skip("needs Linux/glibc: /proc/self/status and mallopt")
    torch.manual_seed(0)
    T, H, V = 2048, 64, 32000
    hidden = torch.randn(1, T, H, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(V, H) * 0.02)
    labels = masked_labels(1, T, V)

    def peak(fn) -> int:
        """Peak RSS above the current RSS while fn() runs forward and backward."""
        pu.peak_memory_reset(CPU)
        start = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        loss, _ = fn()
        loss.backward()
        hidden.grad = weight.grad = None
        return pu.peak_memory(CPU)[0] - start

    chunked = peak(lambda: pu.chunked_lm_loss(hidden, weight, labels, 128))  # first: warms up the libraries
    plain = peak(lambda: pu.causal_lm_loss(torch.nn.functional.linear(hidden, weight), labels))
    logits = T * V * 4  # 262 MB of float32 logits
    assert plain > 2 * logits  # log-softmax kept for backward, its gradient, the logits' gradient
    assert chunked < plain / 4 and chunked < logits / 2


# ----------------------------------------------------------------------------------------------
# 2. Attention and checkpointing on a tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama (GQA) with our tokenizer files."""
    return make_tiny_model(tmp_path_factory.mktemp("lean") / "llama", "llama", layers=4,
                           tokenizer_dir=REPO / "models" / "SmolLM2-135M-Instruct")


def top_model(model_dir: Path, layers: int, attn: str = "sdpa", **kw) -> pu.TopModel:
    """TopModel of the last `layers` blocks, attention through `attn`."""
    config = pu.read_config(model_dir)
    config._attn_implementation = attn
    weights = pu.Weights(model_dir, config)
    return pu.TopModel(weights, config.num_hidden_layers - layers, CPU, **kw).train()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_training_step_saves_no_attention_matrix(tiny_dir, checkpoint):
    """At T=512 no tensor of T x T elements is saved for backward (is_causal SDPA); eager attention would save some."""
    T = 512
    x = torch.randn(1, T, 64)
    labels = masked_labels(1, T, 49152)

    def largest(attn: str) -> int:
        top = top_model(tiny_dir, 2, attn, checkpoint=checkpoint)
        saved, (loss, _) = saved_tensors(lambda: top.loss(x, labels, chunk_tokens=128))
        loss.backward()  # the recomputed blocks (checkpoint) save theirs in backward: not seen here, see below
        return max(t.numel() for t in non_parameters(saved, top))

    assert largest("sdpa") < T * T
    if not checkpoint:
        assert largest("eager") >= 4 * T * T  # the test can see an attention matrix: [1, heads, T, T]


def test_sdpa_block_backward_saves_no_attention_matrix(tiny_dir):
    """Inside one block (as checkpoint recomputes it), the saved tensors stay below T x T too."""
    T = 512
    top = top_model(tiny_dir, 1)
    x = torch.randn(1, T, 64, requires_grad=True)
    saved, h = saved_tensors(lambda: top.hidden(x))
    assert max(t.numel() for t in non_parameters(saved, top)) < T * T


def test_checkpointing_gives_the_same_gradients(tiny_dir):
    """Gradients with and without per-block checkpointing are equal (fp32), and far fewer tensors are kept."""
    torch.manual_seed(0)
    x = torch.randn(1, 96, 64)
    labels = masked_labels(1, 96, 49152)
    grads, kept = [], []
    for checkpoint in (False, True):
        top = top_model(tiny_dir, 3, checkpoint=checkpoint)
        saved, (loss, n) = saved_tensors(lambda: top.loss(x, labels, chunk_tokens=40))
        (loss / n).backward()
        grads.append({k: p.grad for k, p in top.named_parameters()})
        kept.append(sum(t.numel() for t in non_parameters(saved, top)))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=0, msg=k)
    assert kept[1] < kept[0] / 3


def test_master_dtype(tiny_dir):
    """bfloat16 master weights hold the trained tensors in bf16; float16 is refused."""
    top = top_model(tiny_dir, 1, master_dtype="bfloat16")
    assert {p.dtype for p in top.parameters()} == {torch.bfloat16}
    with pytest.raises(pu.PelatunError, match="MASTER_DTYPE"):
        top_model(tiny_dir, 1, master_dtype=torch.float16)


# ----------------------------------------------------------------------------------------------
# 3. Optimizers


@pytest.fixture(scope="module")
def lean_cache(tiny_dir, tmp_path_factory):
    """Hidden states of a small text at the input of the top 2 blocks."""
    d = tmp_path_factory.mktemp("lean_cache")
    cache, _, _ = build_cache(tiny_dir, write_text(d / "d.txt"), d / "act", train_layers=2, context_length=CTX,
                              batch_tokens=CTX, val_fraction=0.25)
    return cache


def run_train(model_dir, cache, optimizer, epochs=2, master_dtype=torch.float32, **kw):
    """Train the top 2 blocks; returns (top, history)."""
    kw = {"lr": 1e-3, "clip_grad": 1.0, "chunk_tokens": 8, **kw}
    top = top_model(model_dir, 2, master_dtype=master_dtype, checkpoint=True)
    history = pu.train(top, cache, epochs=epochs, batch_tokens=4 * CTX, weight_decay=0.01, warmup_steps=2, seed=0,
                       device=CPU, dtype=torch.float32, optimizer=optimizer, **kw)
    return top, history


@pytest.mark.parametrize("optimizer,lr,master_dtype", [("adamw", 1e-3, torch.float32), ("adafactor", 3e-2, torch.float32),
                                                       ("fused", 1e-3, torch.float32), ("adamw", 1e-3, torch.bfloat16)])
def test_optimizer_lowers_training_loss(tiny_dir, lean_cache, optimizer, lr, master_dtype):
    """Each CPU optimizer (and bf16 master weights) lowers the training loss over a few epochs."""
    _, history = run_train(tiny_dir, lean_cache, optimizer, epochs=3, master_dtype=master_dtype, lr=lr)
    k = len(history["train_loss"]) // 3
    assert np.mean(history["train_loss"][-k:]) < np.mean(history["train_loss"][:k]) - 0.05


def test_fused_equals_adamw_without_clipping(tiny_dir, lean_cache):
    """Updates inside backward (with accumulation over 4 micro-batches per step) give AdamW's weights."""
    adamw, h1 = run_train(tiny_dir, lean_cache, "adamw", clip_grad=0)
    fused, h2 = run_train(tiny_dir, lean_cache, "fused", clip_grad=0)
    np.testing.assert_allclose(h2["train_loss"], h1["train_loss"], rtol=1e-5)
    want, got = adamw.trained_state(), fused.trained_state()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert not any(p.grad is not None for p in fused.parameters())
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in fused.parameters())  # train() removed its hooks


def test_adamw8bit_on_cpu_says_what_to_use():
    top = torch.nn.Linear(2, 2)
    with pytest.raises(pu.PelatunError, match="CUDA.*'adafactor'.*'fused'"):
        pu.make_optimizer(top, "adamw8bit", lr=1e-3, weight_decay=0.0, device=CPU)


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(pu.PelatunError, match="'adamw', 'adamw8bit', 'adafactor', 'fused'"):
        pu.make_optimizer(torch.nn.Linear(2, 2), "sgd", lr=1e-3, weight_decay=0.0, device=CPU)


# ----------------------------------------------------------------------------------------------
# 4. Memory planner

STEP = r"""
import json, sys
from pathlib import Path
import torch
import pelatun_utils as pu
a = json.loads(sys.argv[1])
cpu = torch.device("cpu")
pu.return_freed_memory()  # as train() does on CPU
torch.manual_seed(0)
weights = pu.Weights(a["model_dir"])
top = pu.TopModel(weights, weights.config.num_hidden_layers - a["train_layers"], cpu, a["master_dtype"],
                  checkpoint=a["checkpoint"]).train()
H, V, T = weights.config.hidden_size, weights.config.vocab_size, a["tokens"]
del weights
opt = pu.make_optimizer(top, a["optimizer"], lr=1e-4, weight_decay=0.01, device=cpu, clip_grad=1.0)
x = torch.randn(1, T, H, dtype=top.lm_head.weight.dtype)
labels = torch.randint(0, V, (1, T))
for _ in range(a["steps"]):
    pu.train_step(top, opt, [(x, labels)] * a["micro_batches"], (T - 1) * a["micro_batches"], scaler=torch.amp.GradScaler("cuda", enabled=False),
                  clip_grad=1.0, chunk_tokens=a["chunk_tokens"], device=cpu, dtype=torch.float32)
status = Path("/proc/self/status").read_text()
print(json.dumps({"peak": int(status.split("VmHWM:")[1].split()[0]) * 1024}))
"""


def measure_step(model_dir: Path, **a) -> int:
    """Peak RSS (VmHWM) of a fresh process that builds the TopModel and runs training steps (one by default)."""
    a = {"model_dir": str(model_dir), "master_dtype": "float32", "checkpoint": False, "chunk_tokens": 0, "steps": 1,
         "micro_batches": 1, **a}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # two runs share the 2 cores
    r = subprocess.run([sys.executable, "-c", STEP, json.dumps(a)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["peak"]


def random_model(out: Path, hidden: int, layers: int, vocab: int = 32000) -> Path:
    """A random Llama of `layers` blocks (all trained), saved with save_pretrained."""
    heads = hidden // 64
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=max(1, heads // 4), tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


PLANNED = [  # hidden, train_layers, tokens, optimizer, chunk_tokens, checkpoint, steps, samples per step
    (512, 1, 1024, "adamw", 256, False, 1, 1),
    (512, 2, 2048, "fused", 512, True, 1, 1),
    (1024, 1, 1024, "adafactor", 256, False, 1, 1),
]
PLANNED_SLOW = [
    (512, 1, 2048, "adamw", 0, False, 1, 1),  # the plain loss: [tokens, vocab] logits
    (512, 2, 1024, "adamw", 256, False, 2, 2),  # AdamW's state exists from the second step on: plan["total"]
]


def check_plans(rows: list[tuple], tmp_path: Path) -> None:
    """Measure each row in a fresh process (two at a time) and compare with predict_train_peak (15%)."""
    if not pu.return_freed_memory():
        pytest.skip("needs Linux/glibc: /proc/self/status and mallopt")
    dirs = {(h, l): random_model(tmp_path / f"m{h}_{l}", h, l) for h, l, *_ in rows}
    tiny = random_model(tmp_path / "tiny", 64, 2, vocab=512)
    jobs = [dict(model_dir=tiny, train_layers=2, tokens=16, optimizer="adamw", chunk_tokens=8, checkpoint=True)]
    jobs += [dict(model_dir=dirs[h, l], train_layers=l, tokens=t, optimizer=o, chunk_tokens=c, checkpoint=ck, steps=n,
                  micro_batches=m) for h, l, t, o, c, ck, n, m in rows]
    with ThreadPoolExecutor(2) as pool:
        measured = list(pool.map(lambda a: measure_step(**a), jobs))
    # The baseline: the process itself, measured on a tiny model whose tensors are a few MB (same code paths).
    tiny_plan = pu.predict_train_peak(pu.read_config(tiny), 2, 16, "adamw", torch.float32, 8, True, "cpu", baseline=0)
    baseline = measured[0] - tiny_plan["first_step"]
    print(f"baseline {pu.human_bytes(baseline)} (CPU_BASELINE_BYTES {pu.human_bytes(pu.CPU_BASELINE_BYTES)})")
    errors = []
    for (h, l, t, o, c, ck, n, m), got in zip(rows, measured[1:]):
        plan = pu.predict_train_peak(pu.read_config(dirs[h, l]), l, t, o, torch.float32, c, ck, "cpu",
                                     micro_batches=m, baseline=baseline)
        want = plan["first_step" if n == 1 else "total"]
        errors.append((want / got - 1, f"hidden {h}, {l} layer(s), T={t}, {o}, chunk {c}, checkpoint {ck}, {n} "
                                       f"step(s) of {m} sample(s): predicted {pu.human_bytes(want)}, measured "
                                       f"{pu.human_bytes(got)}"))
        print(f"{errors[-1][1]} ({errors[-1][0]:+.1%})")
    assert all(abs(e) < 0.15 for e, _ in errors), errors


def test_planner_within_15_percent(tmp_path):
    """predict_train_peak's first_step is within 15% of a fresh process's peak RSS after one training step."""
    check_plans(PLANNED, tmp_path)


@pytest.mark.slow
def test_planner_plain_loss_and_steady_state(tmp_path):
    """The same for the plain loss, and for total: two steps of two samples each (state and gradients held)."""
    check_plans(PLANNED_SLOW, tmp_path)


def test_planner_parts():
    """Lean choices lower the prediction where they should; the parts are named; bad names are refused."""
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    plan = lambda **kw: pu.predict_train_peak(config, **{"train_layers": 1, "tokens": 4096, "optimizer": "adamw",
                                                         "chunk_tokens": 1024, "device_type": "cuda", **kw})
    base = plan()
    assert {"weights", "grads", "optimizer_state", "activations", "logits_chunk", "baseline", "total"} <= set(base)
    assert base["weights"] == (202_383_360 + 4096 + 32000 * 4096) * 4  # one Llama-2-7B block + norm + lm_head
    assert plan(chunk_tokens=0)["total"] > base["total"] > plan(optimizer="fused")["total"]
    assert plan(optimizer="adamw8bit")["optimizer_state"] < base["optimizer_state"] / 3
    assert plan(master_dtype="bfloat16")["weights"] == base["weights"] // 2
    assert plan(train_layers=2, checkpoint=True)["activations"] < plan(train_layers=2)["activations"]
    with pytest.raises(pu.PelatunError, match="OPTIMIZER"):
        plan(optimizer="sgd")
