"""Crash safety of the pass: kill -9 anywhere and resume to the same bits; torn parts; a full disk."""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pelatun_utils as pu
from helpers import build_cache, write_text

SCRIPT = Path(__file__).with_name("run_pipeline.py")
TRAIN_SCRIPT = Path(__file__).with_name("run_training.py")


def run_script(script: Path, *args, kill_after: float | None = None) -> tuple[str | None, float]:
    """Run a script until it prints DIGEST, or SIGKILL it `kill_after` s after its START line: (digest, seconds)."""
    p = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    while (line := p.stdout.readline()) and line.strip() != "START":
        pass
    started = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            return None, time.perf_counter() - started
    out = p.communicate()[0]
    assert p.returncode == 0, out
    return out.split("DIGEST ")[1].strip(), time.perf_counter() - started


def run(model, data, act, *args, kill_after: float | None = None) -> str | None:
    """The pass in a subprocess (run_pipeline.py); its digest, or None when killed."""
    digest, run.seconds = run_script(SCRIPT, model, data, act, *args, kill_after=kill_after)
    return digest


def run_training(model, data, act, optimizer, kill_after=None):
    """Training in a subprocess (run_training.py); its weights' digest, or None when killed."""
    digest, run_training.seconds = run_script(TRAIN_SCRIPT, model, data, act, optimizer, kill_after=kill_after)
    return digest


@pytest.mark.parametrize("g,ram,kills", [(2, "", 10), (3, "ram", 4)])
def test_kill_anywhere_resumes_to_the_same_bits(g, ram, kills, tiny_model, tmp_path):
    """SIGKILLs at random moments of the pass, each followed by a resume: the final cache is bit-identical."""
    model = tiny_model("llama", dtype=torch.bfloat16, layers=8)
    data = write_text(tmp_path / "d.txt", n=60)
    want = run(model, data, tmp_path / "clean", g, ram)
    duration = run.seconds
    rng = random.Random(g)
    killed = 0
    for _ in range(3 * kills):  # each killed run makes progress: kills come early enough to leave work for all
        if killed == kills:
            break
        if run(model, data, tmp_path / "killed", g, ram, kill_after=rng.uniform(0, duration / (kills + 1))) is None:
            killed += 1
    assert killed == kills
    assert run(model, data, tmp_path / "killed", g, ram) == want
    a = [h for _, _, h in pu.read_activations(tmp_path / "clean", "train")]
    b = [h for _, _, h in pu.read_activations(tmp_path / "killed", "train")]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_torn_part_is_detected_and_recomputed(tiny_model, tmp_path):
    """Flipped bytes in one part and a truncated-then-regrown file are found by checksums and recomputed."""
    model, data = tiny_model("llama", dtype=torch.float16), write_text(tmp_path / "d.txt")
    cache, _, _ = build_cache(model, data, tmp_path / "act", part_tokens=64)
    want = cache.digest()
    hidden = cache.dir / "train" / "hidden.bin"
    with open(hidden, "r+b") as f:  # flip bytes inside the second part
        f.seek(cache.manifest["splits"]["train"]["parts"][1]["tokens"][0] * 64 * 2 + 10)
        f.write(b"\xff\xff\xff")
    again, stats, _ = build_cache(model, data, tmp_path / "act", part_tokens=64)
    assert stats.blocks_run == 3 and again.digest() == want
    size = hidden.stat().st_size
    with open(hidden, "r+b") as f:  # a torn tail: truncated, then back to size with zeros
        f.truncate(size // 2)
        f.truncate(size)
    again, _, _ = build_cache(model, data, tmp_path / "act", part_tokens=64)
    assert again.digest() == want


def test_changed_token_file_is_refused(tiny_model, tmp_path):
    """Token ids changed behind the cache's back are detected by checksum, with the fix."""
    model, data = tiny_model("llama"), write_text(tmp_path / "d.txt")
    cache, _, _ = build_cache(model, data, tmp_path / "act")
    with open(cache.dir / "train" / "tokens.bin", "r+b") as f:
        f.write(b"\x01\x02")
    with pytest.raises(pu.PelatunError, match="tokens.bin does not match its checksum.*Delete"):
        build_cache(model, data, tmp_path / "act")


def test_full_disk_stops_cleanly_and_resumes(tiny_model, tmp_path, monkeypatch):
    """ENOSPC in the middle of the pass: a clear error, and after space is freed the run resumes to the same bits."""
    model, data = tiny_model("llama", dtype=torch.float16, layers=5), write_text(tmp_path / "d.txt")
    clean = build_cache(model, data, tmp_path / "clean", part_tokens=64)[0]
    want, n_parts = clean.digest(), len(clean.parts())
    real = pu.Cache.store_hidden
    calls = {"n": 0}

    def store(self, split, part, hidden, layer):
        calls["n"] += 1
        if calls["n"] == 2 * n_parts + 2:  # embed, block 0, then the third part of block 1
            raise pu.disk_error(OSError(errno.ENOSPC, "No space left on device"), self.dir)
        return real(self, split, part, hidden, layer)

    monkeypatch.setattr(pu.Cache, "store_hidden", store)
    with pytest.raises(pu.PelatunError, match="disk.*is full.*resumes where it stopped"):
        build_cache(model, data, tmp_path / "act", part_tokens=64)
    monkeypatch.setattr(pu.Cache, "store_hidden", real)
    cache, stats, _ = build_cache(model, data, tmp_path / "act", part_tokens=64)
    assert stats.groups[0] == [1, 2] and cache.digest() == want


def test_enospc_from_the_filesystem_is_a_clean_error(tiny_model, tmp_path, monkeypatch):
    """A real OSError(ENOSPC) raised by the memmap write becomes the disk-full PelatunError."""
    model, data = tiny_model("llama"), write_text(tmp_path / "d.txt")

    class Full(np.memmap):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = pu.Cache.array
    monkeypatch.setattr(pu.Cache, "array", lambda self, s, n, mode="r": real(self, s, n, mode).view(Full)
                        if mode == "r+" else real(self, s, n, mode))
    with pytest.raises(pu.PelatunError, match="is full"):
        build_cache(model, data, tmp_path / "act")



@pytest.mark.parametrize("optimizer,kills", [("adamw", 5), ("fused", 2)])
def test_training_killed_resumes_to_the_same_weights(optimizer, kills, tiny_model, tmp_path):
    """SIGKILLs during training, each followed by a rerun: final fp32 weights and history equal an uninterrupted run."""
    model, data = tiny_model("llama", layers=4), write_text(tmp_path / "d.txt", n=60)
    want = run_training(model, data, tmp_path / "clean", optimizer)
    duration = run_training.seconds
    rng, killed = random.Random(7), 0
    for _ in range(3 * kills):
        if killed == kills:
            break
        if run_training(model, data, tmp_path / "killed", optimizer,
                        kill_after=rng.uniform(0, duration / (kills + 1))) is None:
            killed += 1
    assert killed == kills
    assert run_training(model, data, tmp_path / "killed", optimizer) == want
