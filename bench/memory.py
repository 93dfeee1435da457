"""Peak memory of each phase (embed, one peristaltic block, one training step) on synthetic Llama-2 shapes.

Every variant runs in a FRESH worker process (`python bench/memory.py --worker JSON`), so a peak never
includes another phase's leftovers. What a number is, is recorded with it:
  CPU:  peak RSS of the worker, VmHWM from /proc/self/status (the whole process: interpreter, libraries,
        weights, activations), "peak_rss".
  CUDA: torch.cuda.max_memory_allocated() of the phase, "cuda_max_memory_allocated" (the CUDA context and
        the allocator's cached-but-free memory come on top).
Models: bench/make_synthetic.py writes a 7B with 2 blocks (1.3 GB) and a 70B with its last block only
(keep_last=1: the top block 79 + final norm + lm_head, 2.8 GB) into /tmp; both are deleted afterwards.
Random weights: honest for memory, never for quality.

Phases (T = 4096 tokens, one sample [1, T, hidden]):
  embed   load_matrix("embed") in the stored fp16 + gathering T token embeddings. Predicted: baseline +
          the matrix + one part of T hidden states (plan_pass's peak_memory_embed counts 6 part buffers for
          its reader/writer queues; here there is one part).
  block   load_block in the compute dtype + BlockRunner.run on [1, T, hidden], as the pass does per block.
          Six batches of 1024-4096 tokens (the heap is kept for reuse, as the pass does: keep_freed_memory).
          Predicted: pass_memory(config, 1 block, ...) with no part buffers (none here) + the input and output
          [1, T, hidden] tensors.
  train   TopModel + make_optimizer + two train_step's on one random sample with random labels < 32000, as
          tests/test_lean.py measures it (return_freed_memory() first, as train() does on CPU). Measured: the
          peak after step 1 (no optimizer state before the first update) and the peak over both steps.
          Predicted: predict_train_peak's first_step and max(first_step, total).
Targets (the issue's): 7B block <= 1.5 GiB (the GPU path: fp16 compute); 7B TRAIN_LAYERS=1 step <= 7 GiB with
adamw fp32 state and <= 5 GiB with a lean optimizer; 70B top block + norm + lm_head <= 8 GiB with at least one
lean optimizer; the planner within 15% of each measured peak.

Usage:
  python bench/memory.py                      # all CPU variants (about 25-40 min on 2 cores), writes
                                              # bench/results/memory.json after every variant
  python bench/memory.py --only block7b_fp32,train7b_L1_fused   # some variants
  python bench/memory.py --budget-minutes 30  # skip the variants that no longer fit the time
  python bench/memory.py --device cuda        # the same on a GPU (fp16 compute, autocast, max_memory_allocated)
  python bench/memory.py --table              # Markdown table from bench/results/memory.json
  python bench/memory.py --repredict          # the planner's predictions again for the measured rows
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "memory.json"
GiB = 1 << 30
T = 4096
THREADS = 2
BLOCK_BATCHES = [T, T // 2, T, T // 4, 3 * T // 4, T]  # token counts of the block phase's batches
MAX_PROCESS_BYTES = 12 * GiB  # never start a CPU variant predicted above this (shared machine)

MODELS = {  # name -> make_synthetic arguments
    "7b": dict(shape="7b", layers=2),
    "70b_top": dict(shape="70b", keep_last=1),
}


def train(vid: str, model: str, layers: int, optimizer: str, master: str, checkpoint: bool, target, timeout: int) -> tuple:
    """A training variant: one step's settings (chunked loss of 1024 tokens)."""
    return (vid, "train", model, {"train_layers": layers, "optimizer": optimizer, "master_dtype": master,
                                  "chunk_tokens": 1024, "checkpoint": checkpoint}, target, timeout)


# id, phase, model, settings, target (bytes or None), seconds it may take on 2 CPU cores (timeout)
VARIANTS = [
    ("embed7b", "embed", "7b", {}, None, 120),
    ("block7b_fp32", "block", "7b", {"compute": "float32"}, None, 300),
    ("block7b_bf16", "block", "7b", {"compute": "bfloat16"}, 1.5 * GiB, 300),
    train("train7b_L1_adamw", "7b", 1, "adamw", "float32", False, 7 * GiB, 540),
    train("train7b_L1_adafactor", "7b", 1, "adafactor", "float32", False, 5 * GiB, 480),
    train("train7b_L1_fused", "7b", 1, "fused", "float32", False, 5 * GiB, 400),
    train("train70b_top_adafactor_bf16", "70b_top", 1, "adafactor", "bfloat16", False, 8 * GiB, 1500),
    train("train7b_L2_adafactor_ckpt", "7b", 2, "adafactor", "float32", True, None, 600),
    train("train7b_L2_fused_ckpt", "7b", 2, "fused", "float32", True, None, 600),
    train("train7b_L1_fused_bf16", "7b", 1, "fused", "bfloat16", False, 5 * GiB, 400),
    train("train70b_top_fused_bf16", "70b_top", 1, "fused", "bfloat16", False, 8 * GiB, 1500),
    train("train7b_L2_adamw_ckpt", "7b", 2, "adamw", "float32", True, None, 600),
]
TARGET_NOTES = {
    "block": "7B peristaltic block <= 1.5 GiB (GPU path: 16-bit compute)",
    "train7b_adamw": "7B TRAIN_LAYERS=1 <= 7 GiB with adamw fp32 state",
    "train7b_lean": "7B TRAIN_LAYERS=1 <= 5 GiB with a lean optimizer",
    "train70b": "70B top block + norm + lm_head <= 8 GiB with a lean optimizer",
}


# ----------------------------------------------------------------------------------------------
# Worker: one variant in a fresh process


def worker(a: dict) -> dict:
    """Run one variant and return its measured peak(s)."""
    import torch
    sys.path.insert(0, str(ROOT))
    import pelatun_utils as pu
    torch.set_num_threads(THREADS)
    device = torch.device(a["device"])
    cuda = device.type == "cuda"
    weights = pu.Weights(a["model_dir"])
    config = weights.config
    stored = pu.model_dtype(weights)
    H, V = config.hidden_size, config.vocab_size
    out = {}
    t0 = time.perf_counter()
    if a["phase"] == "embed":
        pu.peak_memory_reset(device)
        ids = torch.randint(0, V, (T,))
        E = weights.load_matrix("embed", device, stored)
        x = E[ids.to(device)]
        pu.sync(device)
        out["checksum"] = float(x.float().abs().mean())
        out["peak"], out["kind"] = pu.peak_memory(device)
    elif a["phase"] == "block":
        dtype = getattr(torch, a["compute"])
        if not cuda:
            pu.keep_freed_memory()  # as peristalsis() does on CPU
        runner = pu.BlockRunner(config, device, dtype)
        pu.peak_memory_reset(device)
        block = weights.load_block(config.num_hidden_layers - 1, device, dtype)
        out["peaks"] = [pu.peak_memory(device)[0]]  # after loading
        for t in BLOCK_BATCHES:  # batches of several lengths, as a pass runs them: the heap's reuse shows
            x = torch.randn(1, t, H, dtype=dtype, device=device)
            y = runner.run([(config.num_hidden_layers - 1, block)], x, None, round_to=stored)
            pu.sync(device)
            out["peaks"].append(pu.peak_memory(device)[0])
        out["checksum"] = float(y.float().abs().mean())
        out["peak"], out["kind"] = pu.peak_memory(device)
    else:  # train
        if not cuda:
            pu.return_freed_memory()  # as train() does on CPU
        pu.peak_memory_reset(device)
        torch.manual_seed(0)
        compute = pu.pick_compute_dtype("auto", device, stored)
        top = pu.TopModel(weights, config.num_hidden_layers - a["train_layers"], device, a["master_dtype"],
                          checkpoint=a["checkpoint"]).train()
        del weights
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and compute == torch.float16)
        opt = pu.make_optimizer(top, a["optimizer"], lr=1e-5, weight_decay=0.01, device=device, scaler=scaler,
                                clip_grad=1.0)
        x = torch.randn(1, T, H, dtype=pu.input_dtype(top, device, compute), device=device)
        labels = torch.randint(0, min(V, 32000), (1, T), device=device)
        out["loss"], out["step_seconds"], out["peaks"] = [], [], []
        for _ in range(a.get("steps", 2)):
            s0 = time.perf_counter()
            loss = pu.train_step(top, opt, [(x, labels)], T - 1, scaler=scaler, clip_grad=1.0,
                                 chunk_tokens=a["chunk_tokens"], device=device, dtype=compute)
            pu.sync(device)
            out["step_seconds"].append(round(time.perf_counter() - s0, 1))
            out["loss"].append(loss / (T - 1))
            out["peaks"].append(pu.peak_memory(device)[0])  # cumulative: the peak so far
            if a.get("progress"):  # what a timed-out worker leaves behind
                Path(a["progress"]).write_text(json.dumps({**out, "steps_done": len(out["peaks"])}))
        out["peak"], out["kind"] = pu.peak_memory(device)
        out["compute_dtype"] = str(compute).replace("torch.", "")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ----------------------------------------------------------------------------------------------
# Predictions (in the parent: the planner's own functions, no weights read)


def predict(phase: str, model_dir: Path, s: dict, device_type: str) -> dict:
    """The planner's prediction of a variant's peak, in bytes by part and 'total' (and 'first_step' for train)."""
    import torch
    sys.path.insert(0, str(ROOT))
    import pelatun_utils as pu
    config = pu.read_config(model_dir)
    H, V = config.hidden_size, config.vocab_size
    cuda = device_type == "cuda"
    base = 0 if cuda else pu.CPU_BASELINE_BYTES
    stored = torch.float16  # make_synthetic's dtype here
    if phase == "embed":
        parts = {"baseline": base, "embed matrix": V * H * stored.itemsize, "one part of hidden states": T * H * stored.itemsize}
        return {"parts": parts, "total": sum(parts.values())}
    if phase == "block":
        dtype = getattr(torch, s["compute"])
        m = pu.pass_memory(config, 1, False, torch.device(device_type), dtype, stored, batch_tokens=T,
                           part_bytes=0, ram_bytes=0, baseline=base)
        parts = {k: v for k, v in m["parts"].items() if v}
        parts["input and output [1, T, hidden]"] = 2 * T * H * dtype.itemsize
        return {"parts": parts, "total": sum(parts.values())}
    compute = None if not cuda else torch.float16
    p = pu.predict_train_peak(config, s["train_layers"], T, s["optimizer"], s["master_dtype"], s["chunk_tokens"],
                              s["checkpoint"], device_type, compute_dtype=compute)
    return {"parts": {k: v for k, v in p.items() if k not in ("total", "first_step")},
            "first_step": p["first_step"], "total": max(p["first_step"], p["total"]), "steady_total": p["total"]}


# ----------------------------------------------------------------------------------------------
# Parent


def machine(device: str) -> dict:
    """Cores, RAM, CPU or GPU name, library versions."""
    import torch
    import transformers
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    m = {"cores": os.cpu_count(), "ram_bytes": ram, "cpu": cpu, "threads": THREADS, "python": platform.python_version(),
         "torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def target_of(vid: str, phase: str, shape: str, s: dict, device: str) -> tuple[int | None, str | None]:
    """(bytes, description) of the issue's target for this variant, if it has one."""
    if phase == "block" and shape == "7b" and (device == "cuda" or s["compute"] != "float32"):
        return int(1.5 * GiB), TARGET_NOTES["block"]
    if phase == "train" and shape == "7b" and s["train_layers"] == 1:
        if s["optimizer"] == "adamw":
            return 7 * GiB, TARGET_NOTES["train7b_adamw"]
        return 5 * GiB, TARGET_NOTES["train7b_lean"]
    if phase == "train" and shape == "70b_top" and s["optimizer"] != "adamw":
        return 8 * GiB, TARGET_NOTES["train70b"]
    return None, None


def run_variant(v: tuple, model_dir: Path, device: str, timeout: float) -> dict:
    """Measure one variant in a fresh worker; returns the row (measured, predicted, ratio, target, pass)."""
    vid, phase, shape, s, _, _ = v
    row = {"id": vid, "phase": phase, "shape": {"7b": "Llama-2-7B", "70b_top": "Llama-2-70B top block + norm + lm_head"}[shape],
           "model": shape, "settings": {"tokens": T, **s}, "device": device}
    pred = predict(phase, model_dir, s, device)
    set_prediction(row, pred)
    target, note = target_of(vid, phase, shape, s, device)
    row["target_bytes"], row["target"] = target, note
    if device == "cpu" and pred["total"] > MAX_PROCESS_BYTES:
        row["skipped"] = f"predicted {pred['total'] / GiB:.2f} GiB > the {MAX_PROCESS_BYTES / GiB:.0f} GiB per-process cap here"
        return row
    progress = Path(model_dir).parent / f"{vid}.progress.json"
    progress.unlink(missing_ok=True)
    a = {"phase": phase, "model_dir": str(model_dir), "device": device, "progress": str(progress), **s}
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(a)],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        row["skipped"] = f"timed out after {timeout:.0f} s"
        if progress.exists():  # step 1 finished: its peak is a real measurement, step 2's is missing
            got = json.loads(progress.read_text())
            row["measured_first_step_bytes"], row["kind"] = got["peaks"][0], "peak_rss" if device == "cpu" else "cuda_max_memory_allocated"
            row["ratio_first_step"] = round(got["peaks"][0] / pred["first_step"], 3)
            row["worker"] = got
            row["skipped"] += f" during step {got['steps_done'] + 1}; step 1's peak is measured_first_step_bytes"
        return row
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if r.returncode != 0:
        row["error"] = f"exit {r.returncode}: {r.stderr[-1500:]}"
        return row
    got = json.loads(r.stdout.strip().splitlines()[-1])
    row["measured_bytes"], row["kind"] = got.pop("peak"), got.pop("kind")
    row["worker"] = got
    if phase == "train" and got.get("peaks"):
        row["measured_first_step_bytes"] = got["peaks"][0]
    return score(row, pred)


def set_prediction(row: dict, pred: dict) -> None:
    """Put the planner's prediction into a row."""
    row["predicted_bytes"], row["predicted_parts"] = pred["total"], pred["parts"]
    if "first_step" in pred:
        row["predicted_first_step_bytes"] = pred["first_step"]


def score(row: dict, pred: dict) -> dict:
    """Set a measured row's prediction, ratio, planner_within_15pct and pass."""
    set_prediction(row, pred)
    row["ratio"] = round(row["measured_bytes"] / row["predicted_bytes"], 3)
    row["planner_within_15pct"] = abs(row["ratio"] - 1) <= 0.15
    if "first_step" in pred and "measured_first_step_bytes" in row:
        row["ratio_first_step"] = round(row["measured_first_step_bytes"] / pred["first_step"], 3)
    if row.get("target_bytes") is not None:
        row["pass"] = row["measured_bytes"] <= row["target_bytes"]
    return row


def repredict(results: dict, tmp: Path) -> dict:
    """Recompute every measured row's prediction with the current planner (config.json only, no weights)."""
    from make_synthetic import make_config, write_config
    for shape, kw in MODELS.items():
        (tmp / shape).mkdir(parents=True, exist_ok=True)
        write_config(make_config(**kw), tmp / shape, "float16")
    for row in results["rows"]:
        if "measured_bytes" in row:
            score(row, predict(row["phase"], tmp / row["model"], row["settings"], row.get("device", "cpu")))
    order = {v[0]: k for k, v in enumerate(VARIANTS)}
    results["rows"].sort(key=lambda r: order.get(r["id"], len(order)))
    results["summary"] = summarize(results["rows"])
    results["repredicted"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return results


def summarize(rows: list[dict]) -> dict:
    """Pass/fail per issue target (any variant of the target passing counts for 'with at least one')."""
    out = {}
    for key, note in TARGET_NOTES.items():
        rs = [r for r in rows if r.get("target") == note and "measured_bytes" in r]
        out[note] = ("not measured" if not rs else "pass" if any(r["pass"] for r in rs) else "fail")
    ms = [r for r in rows if "ratio" in r]
    out["planner within 15% of each measured peak"] = (
        "not measured" if not ms else "pass" if all(r["planner_within_15pct"] for r in ms) else
        "fail: " + ", ".join(f"{r['id']} {r['ratio']:.2f}" for r in ms if not r["planner_within_15pct"]))
    return out


def write(results: dict) -> None:
    """bench/results/memory.json (atomically)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, RESULTS)


def settings_text(s: dict) -> str:
    """Short settings column."""
    keys = {"compute": "compute {}", "train_layers": "TRAIN_LAYERS={}", "optimizer": "{}", "master_dtype": "master {}",
            "chunk_tokens": "chunk {}", "checkpoint": "checkpoint"}
    parts = [f"T={s.get('tokens', T)}"]
    for k, f in keys.items():
        if k in s and s[k] is not False:
            parts.append(f.format(s[k]) if k != "checkpoint" else f)
    return ", ".join(parts)


def markdown_table(results: dict) -> str:
    """The results as a Markdown table (phase, shape, settings, measured, predicted, ratio, target) and a notes line."""
    def g(n):
        return "–" if n is None else f"{n / GiB:.2f} GiB"
    lines = ["| phase | shape | settings | measured | predicted | ratio | target |",
             "|---|---|---|---|---|---|---|"]
    for r in results.get("rows", []):
        if "measured_bytes" in r:
            measured = f"{g(r['measured_bytes'])} ({r['kind']})"
            ratio = f"{r['ratio']:.2f}" + ("" if r["planner_within_15pct"] else " (off >15%)")
        elif "measured_first_step_bytes" in r:
            measured = f"step 1 only: {g(r['measured_first_step_bytes'])} ({r['kind']}); step 2 not run (time)"
            ratio = f"{r['ratio_first_step']:.2f} (vs first_step {g(r['predicted_first_step_bytes'])})"
        else:
            measured, ratio = f"not measured: {r.get('skipped') or r.get('error', '?')[:80]}", "–"
        if r.get("target_bytes") is None:
            target = "–"
        else:
            verdict = "pass" if r.get("pass") else "FAIL" if "pass" in r else "n/a"
            target = f"≤ {r['target_bytes'] / GiB:g} GiB: {verdict}"
        lines.append(f"| {r['phase']} | {r['shape']} | {settings_text(r['settings'])} | {measured} | "
                     f"{g(r.get('predicted_bytes'))} | {ratio} | {target} |")
    m = results.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram_bytes', 0) / GiB:.0f} GiB RAM"
    notes = (f"Notes: {where}, torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}; each phase in a "
             f"fresh process on synthetic (random-weight) models with the real shapes, T={T} tokens; training rows are "
             f"the peak over two optimizer steps (state exists from the first update) vs the planner's "
             f"max(first_step, total); the block's 16-bit row is bf16 on CPU (same bytes as the GPU's fp16).")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", help="comma-separated variant ids")
    ap.add_argument("--budget-minutes", type=float, default=0, help="skip variants that would run past this")
    ap.add_argument("--tmp", default="/tmp/pelatun-memory-bench", help="where the synthetic models go (deleted)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/memory.json)")
    ap.add_argument("--keep", action="store_true", help="keep the measured rows of the results JSON, run the others")
    ap.add_argument("--repredict", action="store_true", help="recompute the predictions of the measured rows with "
                    "the current planner (no measuring), e.g. after changing it")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of the results JSON")
    a = ap.parse_args(argv)
    global RESULTS
    if a.out:
        RESULTS = a.out
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))), flush=True)
        return
    if a.table:
        print(markdown_table(json.loads(RESULTS.read_text())))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    if a.repredict:
        try:
            write(repredict(json.loads(RESULTS.read_text()), Path(a.tmp)))
        finally:
            shutil.rmtree(a.tmp, ignore_errors=True)
        print(markdown_table(json.loads(RESULTS.read_text())))
        return
    from make_synthetic import make_synthetic
    start = time.perf_counter()
    variants = [v for v in VARIANTS if not a.only or v[0] in a.only.split(",")]
    if a.device == "cuda":  # the GPU computes the block in fp16: the fp32/bf16 CPU variants become one fp16 row
        variants = [v if v[1] != "block" else (v[0].replace("bf16", "fp16"), "block", v[2], {"compute": "float16"}, v[4], v[5])
                    for v in variants if v[0] != "block7b_fp32"]
    results = {"benchmark": "memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(a.device), "tokens": T, "rows": []}
    if a.keep and RESULTS.exists():
        old = json.loads(RESULTS.read_text())
        results["rows"] = [r for r in old["rows"] if "measured_bytes" in r and r.get("device", a.device) == a.device]
        variants = [v for v in variants if v[0] not in {r["id"] for r in results["rows"]}]
    tmp = Path(a.tmp)
    made: dict[str, Path] = {}
    try:
        for v in variants:
            vid, phase, shape = v[0], v[1], v[2]
            left = a.budget_minutes * 60 - (time.perf_counter() - start) if a.budget_minutes else float("inf")
            if shape not in made:
                made[shape] = tmp / shape
                if not (made[shape] / "config.json").exists():
                    print(f"writing synthetic {shape} to {made[shape]} ...", flush=True)
                    make_synthetic(made[shape], dtype="float16", overwrite=True, **MODELS[shape])
            timeout = min(v[5] * (1 if a.device == "cpu" else 0.5), left)
            if timeout < 30:
                row = {"id": vid, "phase": phase, "shape": shape, "settings": {"tokens": T, **v[3]},
                       "skipped": "out of the time budget"}
                row["target_bytes"], row["target"] = target_of(vid, phase, shape, v[3], a.device)
            else:
                print(f"{vid} (timeout {timeout:.0f} s) ...", flush=True)
                try:
                    row = run_variant(v, made[shape], a.device, timeout)
                except Exception:
                    row = {"id": vid, "phase": phase, "shape": shape, "settings": v[3], "error": traceback.format_exc()[-1500:]}
            results["rows"].append(row)
            results["summary"] = summarize(results["rows"])
            results["seconds"] = round(time.perf_counter() - start, 1)
            write(results)
            print(f"  -> {json.dumps({k: row.get(k) for k in ('measured_bytes', 'predicted_bytes', 'ratio', 'pass', 'skipped', 'error')})}",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(markdown_table(results))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
