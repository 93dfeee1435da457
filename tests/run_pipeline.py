"""Run the pass on a model dir (a subprocess for the kill tests): python run_pipeline.py MODEL DATA ACT [G] [RAM]."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import build_cache  # noqa: E402

torch.set_num_threads(1)
model, data, act = map(Path, sys.argv[1:4])
g = int(sys.argv[4]) if len(sys.argv) > 4 else 1
ram = len(sys.argv) > 5 and sys.argv[5] == "ram"
print("START", flush=True)
cache, stats, _ = build_cache(model, data, act, context_length=16, part_tokens=32, batch_tokens=64,
                              val_fraction=0.2, blocks_per_pass=g, keep_in_ram=ram)
print("DIGEST", cache.digest(), flush=True)
