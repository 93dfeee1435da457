"""Side-by-side benchmark of the pass: PeLaTun vs transformers in memory vs AirLLM vs accelerate disk offload.

Every contender computes the same thing from the same token ids and the same batches: the hidden
states at the input of the last block (layer L - 1, TRAIN_LAYERS = 1), for N = 16, 64 and 256 samples.

  pelatun        create_cache + plan_pass + embed + peristalsis (blocks_per_pass / keep_in_ram from the
                 plan under MEMORY_BUDGET), as the notebook runs them
  pelatun_bpp1   the same with blocks_per_pass = 1 and the hidden states through the disk every pass
                 (the seed's schedule)
  floor          transformers, the whole model in memory, output_hidden_states (the compute floor)
  airllm         AirLLM 4.0.0 layer streaming on the CPU (batched: it wraps the transformers forward)
  accelerate     from_pretrained with every model.layers.N on "disk" (offload_folder), output_hidden_states

The HF contenders (floor, airllm, accelerate) run model.model with its layer list cut to the first L - 1
blocks and the final norm replaced by Identity, so hidden_states[-1] is exactly the input of block
L - 1 and nobody computes a block (or an lm_head) that PeLaTun does not.

Each contender x N runs in a FRESH worker process (torch.set_num_threads(2)): setup, warm-up on the first
8 samples, then the timed repeats. The repeats are interleaved in rounds (every contender once per
round, the order rotated each round), so each round's ratios are side by side on this shared machine.
Peak memory is the worker's resource.getrusage(RUSAGE_SELF).ru_maxrss (whole life: imports, load,
warm-up, repeats), plus VmHWM reset through /proc/self/clear_refs just before the timed repeats.

Usage:
  python bench/peristalsis.py                   # everything (about an hour on 2 busy cores)
  python bench/peristalsis.py --models smollm2  # one model
  python bench/peristalsis.py --smoke           # tiny sizes, a minute or two, to check the plumbing
  python bench/peristalsis.py --table           # Markdown table from bench/results/peristalsis.json
  python bench/peristalsis.py --device cuda --models syn7b --threads 8   # on a GPU (bench/gpu_check.sh)
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
RESULTS = ROOT / "bench" / "results" / "peristalsis.json"
CONTENDERS = ["pelatun", "pelatun_bpp1", "floor", "floor_malloc", "airllm", "accelerate"]
THREADS = 2
PASS_BATCH_TOKENS = 8192   # the notebook's defaults
PART_TOKENS = 65536
TRAIN_LAYERS = 1
WARMUP_SAMPLES = 8
MODELS = {
    "smollm2": {
        "name": "SmolLM2-135M-Instruct (real weights, bf16 on disk)",
        "ns": [16, 64, 256], "reps": {16: 3, 64: 3, 256: 3},
        "memory_budget_gib": 4.0,
        "data": "default chat data (pu.build_default_data + pu.load_samples(context_length=512)), first N samples",
    },
    "syn7b": {
        "name": "synthetic Llama-2-7B shape, 4 blocks, fp16 random weights (make_synthetic --shape 7b --layers 4)",
        "ns": [16, 64, 256], "reps": {16: 5, 64: 3, 256: 2}, "sample_tokens": [4, 28],
        "memory_budget_gib": 8.0,
        "data": "random token ids < 32000 (numpy default_rng(0)), N samples of 4-28 tokens (uniform, mean 16)",
        # calibrate() pushes batch_tokens tokens through one block twice; for a 7B block that is minutes
        "calibrate_batch_tokens": 256,
        # on a GPU the blocks' compute is cheap: samples long enough that N = 16 / 64 / 256 take 1 / 3 / 9
        # forward calls of PASS_BATCH_TOKENS, so the streaming tools re-read their weights more often as N grows
        "gpu": {"sample_tokens": [128, 384], "reps": {16: 3, 64: 2, 256: 2},
                "data": "random token ids < 32000 (numpy default_rng(0)), N samples of 128-384 tokens (uniform, mean 256)"},
    },
}
SMOKE = {"smollm2": {"ns": [4, 8], "reps": {4: 1, 8: 2}}, "syn7b": {"ns": [2, 4], "reps": {2: 1, 4: 1}, "sample_tokens": [2, 14]}}


# ----------------------------------------------------------------------------------------------
# Worker side (a fresh process per contender x N)

def worker_env(threads: int = THREADS) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def load_samples(spec: dict):
    """The model's samples (the same in every worker): a list of pu.Sample, and the data file for the cache identity."""
    import numpy as np
    import pelatun_utils as pu
    n = spec["n"]
    if spec["model"] == "smollm2":
        data = pu.build_default_data(ROOT / "data" / "stdlib_chat.jsonl")
        tok = pu.load_tokenizer(spec["model_dir"])
        samples = pu.load_samples(data, tok, 512)
        if len(samples) < n:
            raise RuntimeError(f"the default data has {len(samples)} samples, fewer than N={n}")
        return samples[:n], Path(data)
    rng = np.random.default_rng(0)
    m, (lo, hi) = max(spec["ns_all"]), spec["sample_tokens"]
    lengths = rng.integers(lo, hi + 1, size=m)
    ids = rng.integers(0, 32000, size=int(lengths.sum()), dtype=np.int64)
    data = Path(spec["work"]) / "syn_ids.npy"  # [lengths of the m samples, their ids one after another]
    if not data.exists():
        tmp = data.with_name(f"{data.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # np.save(path) would append .npy to the temporary name
            np.save(f, np.concatenate([lengths, ids]))
        os.replace(tmp, data)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    rows = [list(map(int, ids[starts[i]:starts[i + 1]])) for i in range(n)]
    return [pu.Sample(r, r) for r in rows], data


def ids_sha256(samples) -> str:
    import hashlib
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.ids).encode())
    return h.hexdigest()


class Pelatun:
    """create_cache + plan_pass + embed + peristalsis, as pelatun.ipynb runs them."""

    def __init__(self, spec: dict, schedule: str):
        import torch
        import pelatun_utils as pu
        self.pu, self.spec, self.schedule = pu, spec, schedule
        self.device = torch.device(spec.get("device", "cpu"))
        self.model_dir = Path(spec["model_dir"])
        self.config = pu.read_config(self.model_dir)
        self.weights = pu.Weights(self.model_dir, self.config)
        self.weight_dtype = pu.model_dtype(self.weights)
        self.dtype = pu.pick_compute_dtype("auto", self.device, self.weight_dtype)
        self.target = self.config.num_hidden_layers - TRAIN_LAYERS
        self.budget = int(spec["memory_budget_gib"] * 2**30)
        self.act = Path(spec["work"]) / f"act_{schedule}_{spec['n']}"
        self.info = {"compute_dtype": str(self.dtype), "storage_dtype": str(self.weight_dtype),
                     "target_layer": self.target, "batch_tokens": PASS_BATCH_TOKENS, "part_tokens": PART_TOKENS}

    def identity(self, data: Path) -> dict:
        pu = self.pu
        return pu.cache_identity(self.model_dir, data, {
            "context_length": 512, "long_samples": "window", "max_samples": 0, "val_fraction": 0.0, "seed": 0,
            "storage_dtype": pu.dtype_name(self.weight_dtype), "compute_dtype": pu.dtype_name(self.dtype)})

    def plan(self, cache) -> dict:
        return self.pu.plan_pass(cache, self.config, self.target, self.device, self.dtype, self.weight_dtype,
                                 batch_tokens=PASS_BATCH_TOKENS, part_tokens=PART_TOKENS,
                                 memory_budget=self.budget, blocks_per_pass=0 if self.schedule == "plan" else 1)

    def run(self, samples, data: Path, act: Path | None = None) -> dict:
        import gc
        pu = self.pu
        act = act or self.act
        shutil.rmtree(act, ignore_errors=True)
        gc.collect()
        identity = self.identity(data)
        t0 = time.perf_counter()
        cache = pu.create_cache(act, identity, {"train": samples}, self.config.hidden_size, PART_TOKENS)
        t1 = time.perf_counter()
        plan = self.plan(cache)
        keep = plan["keep_in_ram"] if self.schedule == "plan" else False  # the seed had no RAM mode
        cache.ram = {} if keep else None
        t2 = time.perf_counter()
        e = pu.embed(cache, self.weights, self.device, self.dtype)
        t3 = time.perf_counter()
        st = pu.peristalsis(cache, self.weights, self.target, self.device, self.dtype, PASS_BATCH_TOKENS,
                            plan["blocks_per_pass"], keep)
        t4 = time.perf_counter()
        tokens = sum(len(s.ids) for s in samples)
        passes = len(st.groups)
        moved = st.hidden_bytes_read + st.hidden_bytes_written
        self.last_cache = cache
        return {
            "seconds": t4 - t0,
            "breakdown_seconds": {"create_cache": t1 - t0, "plan_pass": t2 - t1, "embed": t3 - t2, "peristalsis": t4 - t3},
            "plan": {k: plan[k] for k in ("memory_budget", "blocks_per_pass", "passes", "keep_in_ram", "peak_memory_pass",
                                          "peak_memory_parts", "hidden_bytes_per_token_per_pass")},
            "keep_in_ram": keep,
            "embed_stats": vars(e),
            "pass_stats": vars(st),
            "hidden_bytes_read_per_token": st.hidden_bytes_read / tokens,
            "hidden_bytes_written_per_token": (st.hidden_bytes_written + e.hidden_bytes_written) / tokens,
            "pass_hidden_bytes_written_per_token": st.hidden_bytes_written / tokens,
            "hidden_bytes_per_token_per_pass": moved / tokens / max(passes, 1),
            # tokens a block computed, empty slots of packed rows included (the HF contenders' padded_tokens)
            "token_slots_per_block": st.token_slots / max(st.blocks_run, 1),
            "io_wait_fraction": (st.io_wait_seconds + e.io_wait_seconds) / max(t4 - t0, 1e-9),
            "pass_io_wait_seconds": st.io_wait_seconds, "pass_seconds": st.seconds,
            "embed_io_wait_seconds": e.io_wait_seconds,
        }

    def calibrate(self, samples, data: Path) -> dict:
        """plan_pass + calibrate on the full-N cache (not timed): the plan's own estimate, to set against the measurement."""
        pu = self.pu
        act = self.act.with_name(self.act.name + "_cal")
        shutil.rmtree(act, ignore_errors=True)
        cache = pu.create_cache(act, self.identity(data), {"train": samples}, self.config.hidden_size, PART_TOKENS)
        plan = self.plan(cache)
        cal_plan = dict(plan)
        bt = self.spec.get("calibrate_batch_tokens")
        if bt:
            cal_plan["batch_tokens"] = min(bt, PASS_BATCH_TOKENS)
        pu.calibrate(cal_plan, self.weights, cache, self.device, self.dtype)
        shutil.rmtree(act, ignore_errors=True)
        keys = ("seconds_per_token_block", "disk_bytes_per_second", "estimated_compute_seconds", "estimated_io_seconds",
                "estimated_seconds", "batch_tokens")
        return {k: cal_plan[k] for k in keys}

    def hidden(self):
        import numpy as np
        return np.concatenate([h for _, _, h in self.pu.read_activations(self.act, "train")])


class HF:
    """floor / airllm / accelerate: model.model cut to the first L - 1 blocks, norm -> Identity, output_hidden_states."""

    def __init__(self, spec: dict, kind: str):
        import torch
        import pelatun_utils as pu
        self.pu, self.spec, self.kind, self.torch = pu, spec, kind, torch
        self.model_dir = Path(spec["model_dir"])
        self.config = pu.read_config(self.model_dir)
        self.L = self.config.num_hidden_layers
        self.device = device = torch.device(spec.get("device", "cpu"))
        cuda = device.type == "cuda"
        self.storage = pu.model_dtype(pu.Weights(self.model_dir, self.config))
        # what PeLaTun computes in (pick_compute_dtype 'auto'): float32 on a CPU, 16-bit on a GPU
        self.dtype = dtype = pu.pick_compute_dtype("auto", device, self.storage)
        self.info = {"compute_dtype": str(dtype), "batch_tokens": PASS_BATCH_TOKENS, "device": str(device)}
        name = pu.dtype_name(dtype)
        if kind in ("floor", "floor_malloc"):
            from transformers import AutoModelForCausalLM
            if kind == "floor_malloc":
                # the allocator setting PeLaTun's pass uses on a CPU, for the same batch size
                pu.keep_freed_memory(pu.batch_activation_bytes(self.config, PASS_BATCH_TOKENS, dtype))
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, attn_implementation="sdpa",
                                                         device_map=str(device) if cuda else None)
            base = model.model
            self.info["load"] = (f"AutoModelForCausalLM.from_pretrained(dtype={name}, attn_implementation='sdpa'"
                                 f"{', device_map=cuda' if cuda else ''}), the whole model in {'GPU memory' if cuda else 'RAM'}")
        elif kind == "accelerate":
            from transformers import AutoModelForCausalLM
            tied = bool(getattr(self.config, "tie_word_embeddings", False))
            main = 0 if cuda else "cpu"  # accelerate runs the disk-offloaded blocks on the main device
            device_map = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main,
                          "lm_head": main if tied else "disk",
                          **{f"model.layers.{i}": "disk" for i in range(self.L)}}
            off = Path(spec["work"]) / f"offload_{spec['n']}"
            shutil.rmtree(off, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, attn_implementation="sdpa",
                                                         device_map=device_map, offload_folder=str(off))
            base = model.model
            self.offload = off
            self.info["load"] = (f"AutoModelForCausalLM.from_pretrained(dtype={name}, device_map=every model.layers.N "
                                 f"and {'' if tied else 'lm_head '}on 'disk', offload_folder=...)")
        elif kind == "airllm":
            import airllm
            am = airllm.AutoModel.from_pretrained(str(self.model_dir), device="cuda:0" if cuda else "cpu", dtype=dtype,
                                                  layer_shards_saving_path=str(Path(spec["work"]) / "airllm_split"))
            self.am = am
            model = am.model
            base = model.model
            # idx of block L-1 in AirLLM's streamed list (embed is 0): never prefetch the block that the
            # cut model does not run (a real (L-1)-block model would not have it)
            am._streamed_set.discard(self.L)
            self.info["load"] = (f"airllm.AutoModel.from_pretrained(dir, device={'cuda:0' if cuda else 'cpu'!r}, dtype={name}, "
                                 "layer_shards_saving_path=...), prefetching on (default)")
            self.info["airllm_version"] = getattr(airllm, "__version__", None)
        else:
            raise ValueError(kind)
        model.eval()
        base.layers = torch.nn.ModuleList(list(base.layers)[: self.L - TRAIN_LAYERS])
        base.norm = torch.nn.Identity()
        self.model, self.base = model, base

    def run(self, samples, data: Path) -> dict:
        torch, pu = self.torch, self.pu
        lengths = [len(s.ids) for s in samples]
        batches = pu.make_batches(lengths, PASS_BATCH_TOKENS)
        out = [None] * len(samples)
        padded = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                ids, mask = pu.pad_batch([torch.tensor(samples[i].ids, dtype=torch.long) for i in b], 0)
                padded += ids.numel()
                hs = self.base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               output_hidden_states=True, use_cache=False).hidden_states[-1]
                hs = hs.cpu()  # on the host, as PeLaTun's cache is
                for j, i in enumerate(b):
                    out[i] = hs[j, :lengths[i]]
        dt = time.perf_counter() - t0
        self.out = out
        return {"seconds": dt, "forward_calls": len(batches), "padded_tokens": padded}

    def hidden(self):
        import numpy as np
        return np.concatenate([o.float().numpy() for o in self.out])

    def hidden_rounded(self, samples, data: Path):
        """The same forward with every block's output rounded to the model's 16-bit dtype, as PeLaTun stores it
        (not timed): PeLaTun's hidden states should match these, not just come close."""
        hooks = [layer.register_forward_hook(lambda m, i, o: o.to(self.storage).to(self.dtype)) for layer in self.base.layers]
        try:
            self.run(samples, data)
        finally:
            for h in hooks:
                h.remove()
        return self.hidden()


def barrier_probe(reps: int = 60) -> dict:
    """Median ms of one small op (a [70, 576] bf16 row -> float32, a sample's hidden states in SmolLM2) with 2 threads
    and with 1: on an idle machine both are microseconds; when other processes hold the cores, the 2-thread op waits
    for its descheduled partner thread at the parallel region's barrier (untimed, run by the floor after each repeat)."""
    import torch
    x = torch.randn(70, 576).to(torch.bfloat16)
    out = {}
    for th in (THREADS, 1):
        torch.set_num_threads(th)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            x.to(torch.float32)
            ts.append(time.perf_counter() - t0)
        out[f"row_convert_ms_{th}_threads"] = sorted(ts)[len(ts) // 2] * 1e3
    torch.set_num_threads(THREADS)
    return out


def worker_main(spec_path: str) -> None:
    """Setup + warm-up, then answer 'run' / 'finish' commands from stdin with one JSON line each on the saved stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to the log, not into the protocol
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(ROOT))

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        import warnings
        warnings.filterwarnings("ignore")
        import resource
        import numpy as np
        import torch
        torch.set_num_threads(spec.get("threads", THREADS))
        import pelatun_utils as pu
        device = torch.device(spec.get("device", "cpu"))
        t0 = time.perf_counter()
        samples, data = load_samples(spec)
        kind = spec["contender"]
        runner = (Pelatun(spec, "plan" if kind == "pelatun" else "bpp1") if kind.startswith("pelatun") else HF(spec, kind))
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = samples[:min(WARMUP_SAMPLES, len(samples))]
        if kind.startswith("pelatun"):
            runner.run(warm, data, runner.act.with_name(runner.act.name + "_warm"))
            shutil.rmtree(runner.act.with_name(runner.act.name + "_warm"), ignore_errors=True)
        else:
            runner.run(warm, data)
        warmup = time.perf_counter() - t0
        ready = {"ready": True, "setup_seconds": setup, "warmup_seconds": warmup, "warmup_samples": len(warm),
                 "ids_sha256": ids_sha256(samples), "tokens": sum(len(s.ids) for s in samples),
                 "info": runner.info, "rss_after_setup": pu.status_bytes("VmRSS") or 0, "torch_threads": torch.get_num_threads()}
        if device.type == "cuda":
            ready["gpu_memory_after_setup"] = torch.cuda.memory_allocated(device)
        if kind.startswith("pelatun"):
            t1 = time.perf_counter()
            ready["calibrate"] = runner.calibrate(samples, data)
            ready["calibrate_wall_seconds"] = time.perf_counter() - t1
        if kind == "accelerate":
            ready["offload_folder_bytes"] = (sum(p.stat().st_size for p in runner.offload.rglob("*") if p.is_file())
                                             if runner.offload.exists() else 0)
        pu.peak_memory_reset(torch.device("cpu"))  # VmHWM from here on = the timed repeats
        pu.peak_memory_reset(device)  # and the CUDA allocator's peak, on a GPU
        send(ready)
    except Exception as e:
        send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "run":
                u0 = resource.getrusage(resource.RUSAGE_SELF)
                r = runner.run(samples, data)
                u1 = resource.getrusage(resource.RUSAGE_SELF)
                r["cpu_seconds"] = (u1.ru_utime + u1.ru_stime) - (u0.ru_utime + u0.ru_stime)
                if kind == "floor" and device.type == "cpu":
                    r["probe"] = barrier_probe()
                send(r)
            elif cmd["cmd"] == "finish":
                h = runner.hidden()
                hwm, kind_hwm = pu.peak_memory(torch.device("cpu"))  # the timed repeats' peaks, before the re-run below
                done = {"peak_rss_timed_bytes": hwm, "peak_rss_timed_kind": kind_hwm, "hidden_shape": list(h.shape)}
                if device.type == "cuda":
                    done["peak_gpu_timed_bytes"], done["peak_gpu_kind"] = pu.peak_memory(device)
                np.save(cmd["hidden_path"], h.astype(np.float32))
                if cmd.get("rounded_path"):
                    np.save(cmd["rounded_path"], runner.hidden_rounded(samples, data).astype(np.float32))
                done["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                send(done)
                return
        except Exception as e:
            send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            if cmd["cmd"] == "finish":
                return


# ----------------------------------------------------------------------------------------------
# Orchestrator (keeps torch out of its own process)

class Worker:
    def __init__(self, spec: dict, log: Path):
        self.spec = spec
        path = Path(spec["work"]) / f"spec_{spec['contender']}_{spec['n']}.json"
        path.write_text(json.dumps(spec))
        self.logf = open(log, "w")
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.logf, text=True,
                                  env=worker_env(spec.get("threads", THREADS)), cwd=str(ROOT))

    def recv(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            return {"error": f"worker exited with code {self.p.returncode} (see its log)"}
        return json.loads(line)

    def send(self, obj) -> dict:
        try:
            self.p.stdin.write(json.dumps(obj) + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            return {"error": f"worker gone: {e}"}
        return self.recv()

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.logf.close()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for p in ("torch", "transformers", "accelerate", "airllm", "safetensors", "numpy", "huggingface_hub"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def machine(device: str = "cpu", threads: int = THREADS) -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next(int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "ram_bytes": mem, "cpu": cpu, "python": platform.python_version(),
            "os": platform.platform(), "versions": versions(), "torch_threads": threads, "device": device,
            "gpu": gpu_name() if device == "cuda" else None, "loadavg_at_start": os.getloadavg()}


def gpu_name() -> str:
    """The GPU's name, asked of a child process (the orchestrator keeps torch out of its own)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                         capture_output=True, text=True)
    return out.stdout.strip() or f"unknown ({out.stderr.strip().splitlines()[-1:] or 'no output'})"


def compare(floor_path: Path, path: Path) -> dict:
    import numpy as np
    a, b = np.load(floor_path), np.load(path)
    if a.shape != b.shape:
        return {"error": f"shape {b.shape} vs floor {a.shape}"}
    d = np.abs(a - b)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "floor_max_abs": float(np.abs(a).max()), "floor_mean_abs": float(np.abs(a).mean()),
            "max_abs_diff_rel_to_floor_max": float(d.max() / max(float(np.abs(a).max()), 1e-30))}


def run_size(model: str, cfg: dict, n: int, reps: int, work: Path, contenders: list[str], log) -> dict:
    """All contenders for one N: start each fresh worker (one at a time; all at once on a GPU machine, where the
    cores and memory allow it), rounds of interleaved repeats, compare."""
    res = {"n": n, "reps": reps, "contenders": {}, "rounds": []}
    workers = {}

    def ready(c: str, w: Worker) -> None:
        r = w.recv()
        rec = {"status": "ok", "seconds": [], "tokens_per_second": [], "cpu_seconds": [], "runs": []}
        if "error" in r:
            rec.update(status="error", error=r["error"], traceback=r.get("traceback"))
            log(f"[{model} N={n}] {c} failed at setup: {r['error']}")
            w.close()
        else:
            rec.update({k: v for k, v in r.items() if k != "ready"})
            workers[c] = w
            log(f"[{model} N={n}] {c} ready: setup {r['setup_seconds']:.1f} s, warm-up {r['warmup_seconds']:.1f} s")
        res["contenders"][c] = rec

    starting = []
    for c in contenders:
        spec = {"model": model, "model_dir": cfg["model_dir"], "n": n, "ns_all": cfg.get("ns_all", cfg["ns"]), "contender": c,
                "work": str(work), "memory_budget_gib": cfg["memory_budget_gib"],
                "sample_tokens": cfg.get("sample_tokens"), "calibrate_batch_tokens": cfg.get("calibrate_batch_tokens"),
                "device": cfg.get("device", "cpu"), "threads": cfg.get("threads", THREADS)}
        log(f"[{model} N={n}] start {c}")
        w = Worker(spec, work / "logs" / f"{model}_{c}_{n}.log")
        if cfg.get("parallel_setup"):
            starting.append((c, w))
        else:
            ready(c, w)
    for c, w in starting:
        ready(c, w)
    res["contenders"] = {c: res["contenders"][c] for c in contenders}  # in the contenders' order
    shas = {res["contenders"][c].get("ids_sha256") for c in workers}
    res["same_token_ids"] = len(shas) == 1
    if len(shas) > 1:
        log(f"[{model} N={n}] WARNING: workers saw different token ids")
    names = list(workers)
    for k in range(reps):
        order = names[k % len(names):] + names[:k % len(names)] if names else []
        rnd = {"order": order, "loadavg": os.getloadavg(), "seconds": {}, "cpu_seconds": {}}
        for c in order:
            r = workers[c].send({"cmd": "run"})
            rec = res["contenders"][c]
            if "error" in r:
                rec.update(status="error", error=r["error"], traceback=r.get("traceback"))
                log(f"[{model} N={n}] {c} failed: {r['error']}")
                continue
            rec["seconds"].append(r["seconds"])
            rec["tokens_per_second"].append(rec["tokens"] / r["seconds"])
            rec["cpu_seconds"].append(r["cpu_seconds"])
            rec["runs"].append(r)
            rnd["seconds"][c] = r["seconds"]
            rnd["cpu_seconds"][c] = r["cpu_seconds"]
            if "probe" in r:
                rnd["barrier_probe"] = r["probe"]
            log(f"[{model} N={n}] round {k + 1}/{reps} {c}: {r['seconds']:.2f} s, {rec['tokens'] / r['seconds']:.1f} tok/s")
        res["rounds"].append(rnd)
    for c, w in workers.items():
        rec = res["contenders"][c]
        r = w.send({"cmd": "finish", "hidden_path": str(work / f"hidden_{c}_{n}.npy"),
                    "rounded_path": str(work / f"hidden_floor_rounded_{n}.npy") if c == "floor" else None})
        if "error" in r:
            rec.update(status="error", error=r["error"], traceback=r.get("traceback"))
        else:
            rec.update(r)
            rec["peak_rss_kind"] = "ru_maxrss (RUSAGE_SELF) of the fresh worker process, whole life"
        w.close()
        if rec["seconds"]:
            rec["median_seconds"] = median(rec["seconds"])
            rec["median_tokens_per_second"] = median(rec["tokens_per_second"])
            rec["median_cpu_seconds"] = median(rec["cpu_seconds"])
            rec["median_tokens_per_cpu_second"] = rec["tokens"] / rec["median_cpu_seconds"]
    floor = work / f"hidden_floor_{n}.npy"
    for c in contenders:
        p = work / f"hidden_{c}_{n}.npy"
        if c != "floor" and floor.exists() and p.exists():
            res["contenders"][c]["vs_floor"] = compare(floor, p)
        elif c == "floor" and floor.exists():
            res["contenders"][c]["vs_floor"] = {"max_abs_diff": 0.0, "note": "the reference"}
    rounded = work / f"hidden_floor_rounded_{n}.npy"
    for c in contenders:
        p = work / f"hidden_{c}_{n}.npy"
        if c.startswith("pelatun") and rounded.exists() and p.exists():
            res["contenders"][c]["vs_floor_rounded"] = compare(rounded, p)
    for c in contenders:
        for p in (work / f"hidden_{c}_{n}.npy", rounded):
            p.unlink(missing_ok=True)
    # side-by-side ratios: per round, tokens/s of a / tokens/s of b = seconds of b / seconds of a (same tokens)
    pairs = {"pelatun/floor": ("pelatun", "floor"), "pelatun/airllm": ("pelatun", "airllm"),
             "pelatun/accelerate": ("pelatun", "accelerate"), "pelatun_bpp1/floor": ("pelatun_bpp1", "floor"),
             "pelatun_bpp1/airllm": ("pelatun_bpp1", "airllm"), "pelatun_bpp1/accelerate": ("pelatun_bpp1", "accelerate"),
             "airllm/floor": ("airllm", "floor"), "accelerate/floor": ("accelerate", "floor"),
             "pelatun/pelatun_bpp1": ("pelatun", "pelatun_bpp1"), "pelatun/floor_malloc": ("pelatun", "floor_malloc"),
             "floor_malloc/floor": ("floor_malloc", "floor")}
    for key, out in (("seconds", "ratios_tokens_per_second"), ("cpu_seconds", "ratios_tokens_per_cpu_second")):
        ratios = {}
        for name, (a, b) in pairs.items():
            per = [r[key][b] / r[key][a] for r in res["rounds"] if a in r[key] and b in r[key]]
            if per:
                ratios[name] = {"median_of_round_ratios": median(per), "per_round": per}
        res[out] = ratios
    return res


def prepare_model(model: str, work: Path, log, tokenizer_from: Path) -> dict:
    cfg = {"work": str(work)}
    if model == "smollm2":
        sys.path.insert(0, str(ROOT))
        out = subprocess.run([sys.executable, "-c", "import pelatun_utils as pu; "
                              "print(pu.resolve_model('smollm2-135m', 'models'))"], cwd=str(ROOT), env=worker_env(),
                             capture_output=True, text=True, check=True)
        cfg["model_dir"] = out.stdout.strip().splitlines()[-1]
    else:
        d = work / "syn7b4"
        if not (tokenizer_from / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {tokenizer_from}: run the notebook once (it converts SmolLM2 "
                                    f"into models/) or pass --tokenizer-from DIR")
        t0 = time.perf_counter()
        # the tokenizer is copied only because AirLLM's constructor loads one; the ids are random (< 32000)
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_synthetic.py"), "--shape", "7b", "--layers", "4",
                        "--dtype", "float16", "--out", str(d), "--force",
                        "--tokenizer-from", str(tokenizer_from)],
                       cwd=str(ROOT), check=True, capture_output=True, text=True)
        cfg["model_dir"] = str(d)
        cfg["make_synthetic_seconds"] = time.perf_counter() - t0
        log(f"[{model}] synthetic model written in {cfg['make_synthetic_seconds']:.0f} s")
    cfg["config"] = {k: v for k, v in json.loads((Path(cfg["model_dir"]) / "config.json").read_text()).items()
                     if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "dtype", "torch_dtype")}
    return cfg


NOTES = [
    "Every contender computes the input of block L-1 (TRAIN_LAYERS = 1) from the same token ids (checked: the workers' "
    "sha256 of the ids match, 'same_token_ids') in float32 on the CPU. The HF contenders get the best batches a "
    "transformers user gets without packing: sorted by length, make_batches(lengths, 8192), right padding with an "
    "attention mask (padded_tokens in their runs). PeLaTun packs several samples into each row (position ids restart "
    "per sample; transformers' own packed-sequence masks keep them apart) at the row width with the fewest estimated "
    "FLOPs, at most 8192 slots per batch (token_slots_per_block in its runs): it computes fewer empty slots, which is "
    "why it can run faster than the in-memory floor.",
    "HF contenders run model.model with its layers cut to the first L-1 and norm = Identity, so hidden_states[-1] is the "
    "input of block L-1 and no one computes block L-1, the final norm or the lm_head.",
    "PeLaTun stores hidden states in the model's dtype (bf16 for SmolLM2, fp16 for the synthetic 7B) and rounds them "
    "after every block; floor, AirLLM and accelerate keep float32 throughout. Its max_abs_diff vs the floor is that "
    "rounding, compounded over the blocks (SmolLM2 has hidden values near 1e4, where one bf16 step is 64). "
    "vs_floor_rounded compares PeLaTun with the floor's forward re-run (untimed) with each block's output rounded to "
    "the 16-bit dtype by a forward hook: that isolates the storage rounding from any difference in the computation.",
    "tokens/s = real (unpadded) tokens / wall seconds of one repeat. PeLaTun's seconds cover create_cache + plan_pass + "
    "embed + peristalsis (token ids -> cached hidden states); the HF contenders' cover the forward calls of all batches "
    "(one-time model loading, AirLLM's layer splitting and accelerate's offload setup are in setup_seconds, not timed).",
    "Ratios are side by side: in each round every contender runs once (order rotated), ratio = seconds of the other / "
    "seconds of PeLaTun in that round; the JSON gives the per-round ratios and their median.",
    "Allocator: on a CPU PeLaTun's pass keeps freed heap blocks of up to 64 MiB, and up to one batch's activations in "
    "all, for reuse (pu.keep_freed_memory, glibc mallopt); glibc's default maps each large activation fresh, zero-fills "
    "its pages on first touch and gives the heap's top back whenever 128 MiB of it are free (between two blocks). "
    "floor, AirLLM and accelerate run with glibc's defaults, as a transformers user gets them; floor_malloc is the "
    "floor with PeLaTun's setting, so 'PeLaTun / floor_malloc' is the pass with the allocator equal.",
    "The synthetic 7B's N = 16 pass lasts 3-4 s, and its rounds spread widely (0.82-1.08x the floor in the first "
    "run): it runs 5 rounds; the first run, with 3, stays in earlier_runs.",
    "floor_malloc runs for SmolLM2 only: with a sixth resident worker of 4 GiB the synthetic 7B's weight files no "
    "longer stay in the page cache. The synthetic 7B runs as a second invocation (--merge into the same JSON) with "
    "the other five contenders.",
    "Schedules: with the hidden states in RAM (the plan's keep_in_ram) PeLaTun runs one block at a time over them, the "
    "next block read ahead, and writes the disk copy when a group of blocks_per_pass blocks ends; pelatun_bpp1 is the "
    "seed's schedule, one block per pass with the hidden states through the disk every pass. The synthetic 7B samples "
    "have random lengths (4-28 tokens) as real data does; with equal lengths there is nothing to pack.",
    "All weight files are in the page cache after the warm-up (24 GiB RAM holds them all): disk reads here are memory "
    "copies. On a cold or slow disk AirLLM and accelerate, which re-read every block for every forward call, would fall "
    "further behind; PeLaTun reads each block once per pass.",
    "AirLLM 4.0.0 is not the old per-architecture AirLLM: it instantiates the transformers model on the meta device and "
    "streams each module's weights in forward pre-hooks (prefetching the next one on a thread), so it takes batched "
    "input_ids + attention_mask and returns output_hidden_states like transformers. It therefore gets the same batches "
    "as everyone (a bigger batch fits the memory budget but only adds padding: see airllm_budget_max_batch_tokens). "
    "Its streamed-module set drops block L-1, so it does not prefetch the block the cut model never runs.",
    "accelerate: transformers 5 offloads safetensors checkpoints in place: the offload_folder stays empty "
    "(offload_folder_bytes) and each block is read from the original shards and cast to float32 at every forward.",
    "Peak memory: peak_rss_bytes = ru_maxrss of the worker process (imports, load, warm-up, calibrate, repeats); "
    "peak_rss_timed_bytes = VmHWM after resetting it (/proc/self/clear_refs) just before the timed repeats. Both count "
    "mmapped file pages the process touched. Workers of one N live at the same time (idle while others run).",
    "The machine is shared (load average recorded per round): absolute tokens/s are noisy; the per-round ratios are the "
    "numbers to quote, and cpu_seconds (user+sys of the worker, all threads) are less sensitive to the cores being taken.",
    "--device cuda (bench/gpu_check.sh): every contender computes on the GPU in the 16-bit dtype PeLaTun picks "
    "(pick_compute_dtype 'auto'); the floor holds the whole model in GPU memory, accelerate runs its disk-offloaded "
    "blocks on the GPU, AirLLM streams to cuda:0, and every contender's hidden states end on the host, where PeLaTun's "
    "cache is. The workers of one N set up in parallel; floor_malloc (a CPU allocator setting) is not run. The synthetic "
    "7B's samples are 128-384 tokens there (MODELS['syn7b']['gpu']): N = 16 / 64 / 256 then take about 1 / 3 / 9 "
    "forward calls of at most 8192 slots, so the streaming tools read their weights more often as N grows, as they do "
    "on real data. "
    "peak_gpu_timed_bytes: torch.cuda.max_memory_allocated over the timed repeats.",
    "barrier_probe (per round, from the floor worker, CPU only): median ms of one [70, 576] bf16->float32 conversion with 2 threads "
    "and with 1. When other processes hold the 2 cores, every small op that torch splits over 2 threads waits for the "
    "descheduled partner thread (milliseconds instead of microseconds).",
]


def model_settings(model: str, args) -> dict:
    """A model's settings for this run: MODELS, with its GPU sizes on CUDA, tiny sizes for --smoke, and --ns."""
    cfg = dict(MODELS[model], device=args.device, threads=args.threads, parallel_setup=args.device == "cuda")
    gpu = cfg.pop("gpu", {})
    if args.device == "cuda":
        cfg.update(gpu)
    if args.smoke:
        cfg.update(SMOKE[model])
    if args.ns:
        cfg["ns_all"] = cfg["ns"]
        cfg["ns"] = [n for n in args.ns if n in cfg["reps"]]
    return cfg


def main_run(args) -> None:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    out_path = Path(args.out)
    t_start = time.perf_counter()

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    previous = json.loads(out_path.read_text()) if args.merge and out_path.exists() else None
    # a merge keeps the first run's wall times and records its own beside them
    wall, total = ("merge_wall_seconds", "merge_total_wall_seconds") if previous else ("wall_seconds", "total_wall_seconds")
    result = {"benchmark": "bench/peristalsis.py", "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "smoke": args.smoke, "machine": machine(args.device, args.threads),
              "settings": {"device": args.device, "threads": args.threads, "pass_batch_tokens": PASS_BATCH_TOKENS,
                           "part_tokens": PART_TOKENS,
                           "train_layers": TRAIN_LAYERS, "warmup_samples": WARMUP_SAMPLES,
                           "contenders": args.contenders},
              "notes": NOTES, "models": {}}
    if previous:
        result["models"] = dict(previous.get("models", {}))
        result["total_wall_seconds"] = previous.get("total_wall_seconds")
        result["merged_runs"] = previous.get("merged_runs", [{"created": previous.get("created"), "command": previous.get("command"),
                                                              "machine": previous.get("machine")}])
    for model in args.models:
        cfg = model_settings(model, args)
        mwork = work / model
        (mwork / "logs").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            cfg.update(prepare_model(model, mwork, log, Path(args.tokenizer_from)))
        except Exception as e:
            result["models"][model] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            continue
        cfg["reps"] = {str(k): v for k, v in cfg["reps"].items()}
        mres = {k: v for k, v in cfg.items() if k != "work"}
        mres["sizes"] = {}
        if previous and model in previous.get("models", {}):
            old = previous["models"][model]
            mres = {**old, "earlier_runs": old.get("earlier_runs", {})}
            for n in cfg["ns"]:
                if str(n) in old.get("sizes", {}):
                    mres["earlier_runs"].setdefault(str(n), []).append(old["sizes"][str(n)])
        result["models"][model] = mres
        for n in cfg["ns"]:
            mres["sizes"][str(n)] = run_size(model, cfg, n, cfg["reps"][str(n)], mwork, args.contenders,
                                             lambda m: log(m))
            mres["sizes"][str(n)]["created"] = datetime.datetime.now().isoformat(timespec="seconds")
            add_airllm_budget(mres, n)
            mres[wall] = time.perf_counter() - t0
            result[total] = time.perf_counter() - t_start
            write_json(out_path, result)
        mres[wall] = time.perf_counter() - t0
        if not args.keep_work:
            shutil.rmtree(mwork, ignore_errors=True)  # the synthetic model, AirLLM's split, caches
        log(f"[{model}] done in {mres[wall] / 60:.1f} min")
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    if previous:
        result["merged_runs"].append({"created": result["created"], "command": result["command"], "machine": result["machine"]})
    result[total] = time.perf_counter() - t_start
    write_json(out_path, result)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out_path}")
    print(table(result))


def add_airllm_budget(mres: dict, n: int) -> None:
    """The batch AirLLM could take under the same budget, by PeLaTun's own accounting (pass_memory's 'batch activations')."""
    size = mres["sizes"][str(n)]
    rec = size["contenders"].get("airllm")
    if not rec or rec.get("status") != "ok" or "rss_after_setup" not in rec:
        return
    c = mres["config"]
    h, inter, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv = c["num_key_value_heads"]
    block = 2 * h * h + 2 * h * (h // heads) * kv + 3 * h * inter + 2 * h
    wbytes = 2  # bf16 / fp16 on disk
    fixed = rec["rss_after_setup"] + block * 4 + 2 * block * wbytes  # one fp32 block + the raw one + the prefetched one
    per_token = (8 * h + 3 * inter) * 4
    budget = int(mres["memory_budget_gib"] * 2**30)
    rec["airllm_budget_max_batch_tokens"] = max(0, (budget - fixed) // per_token)
    rec["airllm_batch_tokens_used"] = PASS_BATCH_TOKENS


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Markdown table for README quoting

def human(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def table(result: dict) -> str:
    lines = []
    for model, m in result["models"].items():
        if m.get("status") == "error":
            lines.append(f"**{model}**: could not run ({m['error']})\n")
            continue
        mach, settings = result["machine"], result.get("settings", {})
        first = next((size["contenders"] for size in m["sizes"].values()), {})
        compute = next((rec["info"]["compute_dtype"] for rec in first.values() if "info" in rec), "torch.float32")
        gpu = f"{mach['gpu']}, " if mach.get("gpu") else ""
        lines.append(f"**{m.get('name', model)}** ({gpu}{mach['cores']} cores, {mach['cpu']}, torch {mach['versions']['torch']}, "
                     f"{settings.get('threads', THREADS)} threads, {compute.replace('torch.', '')} compute)\n")
        lines.append("| contender | N | tokens/s | ratio to floor | tokens/CPU-s | CPU ratio to floor | peak RSS | max abs diff vs floor |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for n, size in m["sizes"].items():
            ratios = size.get("ratios_tokens_per_second", {})
            cratios = size.get("ratios_tokens_per_cpu_second", {})
            for c, rec in size["contenders"].items():
                if rec.get("status") != "ok":
                    lines.append(f"| {c} | {n} | failed: {rec.get('error', '?')[:60]} | | | | | |")
                    continue
                tps = rec.get("median_tokens_per_second")
                cps = rec.get("median_tokens_per_cpu_second")
                r = 1.0 if c == "floor" else ratios.get(f"{c}/floor", {}).get("median_of_round_ratios")
                ratio = f"{r:.2f}" if r is not None else "-"
                r = 1.0 if c == "floor" else cratios.get(f"{c}/floor", {}).get("median_of_round_ratios")
                cratio = f"{r:.2f}" if r is not None else "-"
                scps = f"{cps:.1f}" if cps else "-"
                diff = rec.get("vs_floor", {}).get("max_abs_diff")
                sdiff = "-" if diff is None else ("0" if diff == 0 else f"{diff:.3g}")
                reps = len(rec.get("seconds", []))
                peak = human(rec.get("peak_rss_bytes"))
                if rec.get("peak_gpu_timed_bytes") is not None:
                    peak += f" (GPU {human(rec['peak_gpu_timed_bytes'])})"
                lines.append(f"| {c} | {n} | {tps:.1f} ({reps}x) | {ratio} | {scps} | {cratio} | {peak} "
                             f"| {sdiff} |" if tps else f"| {c} | {n} | - | - | - | - | - | - |")
        lines.append("")
        rows = []
        for n, size in m["sizes"].items():
            r = size.get("ratios_tokens_per_second", {})
            rc = size.get("ratios_tokens_per_cpu_second", {})
            fmt = lambda d, k: "-" if d.get(k, {}).get("median_of_round_ratios") is None else f"{d[k]['median_of_round_ratios']:.2f}"
            both = lambda k: f"{fmt(r, k)} / {fmt(rc, k)}"
            rows.append(f"| {n} | {both('pelatun/floor')} | {both('pelatun/airllm')} | {both('pelatun/accelerate')} | "
                        f"{both('pelatun_bpp1/floor')} | {both('pelatun/floor_malloc')} |")
        lines.append("| N | PeLaTun / floor | PeLaTun / AirLLM | PeLaTun / accelerate | PeLaTun bpp=1 / floor "
                     "| PeLaTun / floor with PeLaTun's malloc setting |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        lines += rows
        lines.append("")
    lines.append("tokens/s: median of the repeats (count in parentheses); ratios: median of per-round side-by-side "
                 "ratios (second table: wall / CPU-time); tokens/CPU-s: real tokens per second of the worker's user+sys "
                 "CPU time (all threads), less sensitive to other processes taking the cores; peak RSS: ru_maxrss of a fresh process per contender and N (GPU: the CUDA allocator's peak during the timed repeats); max abs diff: hidden states at "
                 "the input of the last block vs the in-memory transformers forward (PeLaTun rounds to the model's "
                 "16-bit dtype after every block).")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,syn7b", help="comma list of smollm2, syn7b")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--work", default="/tmp/pelatun_bench", help="scratch folder (deleted afterwards)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the plumbing")
    p.add_argument("--ns", help="comma list of N to run (default: each model's own list)")
    p.add_argument("--merge", action="store_true", help="update the sizes run in the existing --out JSON (the results "
                   "they replace are kept under the model's 'earlier_runs'), leaving everything else as it is")
    p.add_argument("--table", nargs="?", const=str(RESULTS), help="print the Markdown table of a results JSON and exit")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every contender computes (cuda: "
                   "16-bit compute as PeLaTun picks it, workers set up in parallel, no floor_malloc)")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads per worker (default {THREADS})")
    p.add_argument("--tokenizer-from", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"),
                   help="tokenizer files for the synthetic model (AirLLM's constructor loads one; the ids are random)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke and a.out == str(RESULTS):
        a.out = "/tmp/pelatun_bench_smoke.json"  # never overwrite the real results with smoke numbers
    a.models = [m for m in a.models.split(",") if m]
    a.contenders = [c for c in a.contenders.split(",") if c]
    a.ns = [int(n) for n in a.ns.split(",")] if a.ns else None
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}")
    for c in a.contenders:
        if c not in CONTENDERS:
            p.error(f"unknown contender {c!r}")
    if a.device == "cuda" and "floor_malloc" in a.contenders:
        a.contenders.remove("floor_malloc")  # a CPU allocator setting: nothing to compare on a GPU
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        worker_main(a.worker)
    elif a.table:
        print(table(json.loads(Path(a.table).read_text())))
    else:
        main_run(a)


if __name__ == "__main__":
    main()


def markdown_table(result: dict) -> str:
    """README's table (bench/update_readme.py calls this)."""
    return table(result)
