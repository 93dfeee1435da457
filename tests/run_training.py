"""Train on a cache in a subprocess (the kill tests): python run_training.py MODEL DATA ACT OPTIMIZER."""
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pelatun_utils as pu  # noqa: E402
from helpers import CPU, build_cache  # noqa: E402

torch.set_num_threads(1)
model_dir, data, act = map(Path, sys.argv[1:4])
cache, _, _ = build_cache(model_dir, data, act, context_length=32, val_fraction=0.2)
top = pu.TopModel(pu.Weights(model_dir), 2, CPU)
print("START", flush=True)
history = pu.train(top, cache, epochs=3, lr=1e-3, batch_tokens=64, weight_decay=0.01, warmup_steps=2, seed=0,
                   device=CPU, dtype=torch.float32, eval_every=4, optimizer=sys.argv[4],
                   checkpoint_root=act / "checkpoints", checkpoint_every=1)
h = hashlib.sha256()
for k, v in sorted(top.trained_state().items()):
    h.update(k.encode() + v.numpy().tobytes())
print("DIGEST", h.hexdigest(), len(history["train_loss"]), len(history["val_loss"]), flush=True)
