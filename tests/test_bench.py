"""bench/peristalsis.py's plumbing that needs no model: its options and its README table."""
import numpy as np

import pelatun_utils as pu
from bench import peristalsis as bp


def test_cuda_runs_every_contender_but_the_cpu_allocator_setting():
    a = bp.parse_args(["--device", "cuda", "--models", "syn7b", "--threads", "8"])
    assert a.device == "cuda" and a.threads == 8 and a.models == ["syn7b"]
    assert "floor_malloc" not in a.contenders and {"pelatun", "floor", "airllm", "accelerate"} <= set(a.contenders)
    assert "floor_malloc" in bp.parse_args([]).contenders  # on a CPU it runs
    assert bp.worker_env(8)["OMP_NUM_THREADS"] == "8"


def test_gpu_samples_need_more_forward_calls_as_n_grows():
    """On a GPU the synthetic 7B gets samples long enough that the streaming tools' forward calls grow with N."""
    gpu = bp.model_settings("syn7b", bp.parse_args(["--device", "cuda"]))
    cpu = bp.model_settings("syn7b", bp.parse_args([]))
    assert gpu["parallel_setup"] and not cpu["parallel_setup"] and cpu["sample_tokens"] == [4, 28]
    lo, hi = gpu["sample_tokens"]
    lengths = np.random.default_rng(0).integers(lo, hi + 1, size=max(gpu["ns"])).tolist()  # as load_samples draws them
    calls = [len(pu.make_batches(lengths[:n], bp.PASS_BATCH_TOKENS)) for n in gpu["ns"]]
    assert calls == sorted(calls) and calls[0] == 1 and calls[-1] >= 8


def test_table_names_the_gpu_its_dtype_and_peaks():
    rec = {"status": "ok", "median_tokens_per_second": 1000.0, "median_tokens_per_cpu_second": 500.0,
           "seconds": [1.0, 1.1], "peak_rss_bytes": 3 * 2**30, "peak_gpu_timed_bytes": 2**30,
           "info": {"compute_dtype": "torch.bfloat16"}, "vs_floor": {"max_abs_diff": 0.5}}
    result = {"machine": {"cores": 16, "cpu": "x86", "gpu": "NVIDIA H200", "versions": {"torch": "2.11"}},
              "settings": {"device": "cuda", "threads": 8},
              "models": {"syn7b": {"name": "7B shape", "sizes": {"16": {
                  "contenders": {"pelatun": rec, "floor": dict(rec, vs_floor={"max_abs_diff": 0.0})},
                  "ratios_tokens_per_second": {"pelatun/floor": {"median_of_round_ratios": 1.5}}}}}}}
    out = bp.table(result)
    assert "NVIDIA H200, 16 cores" in out and "8 threads, bfloat16 compute" in out
    assert "3.00 GiB (GPU 1.00 GiB)" in out and "| pelatun | 16 | 1000.0 (2x) | 1.50 |" in out
