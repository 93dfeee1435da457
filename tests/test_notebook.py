"""The notebook, top to bottom, headless, on the real default model and data (small parameters)."""
import ast
import json
import math

import nbformat
import papermill
import pytest
import torch
import transformers

from conftest import REPO

NOTEBOOK = REPO / "pelatun.ipynb"


def test_notebook_is_committed_clean():
    """No outputs in the committed notebook; one 'parameters' cell holding only UPPER_CASE literals."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign) and node.targets[0].id.isupper()
        ast.literal_eval(node.value)
    names = {n.targets[0].id for n in ast.parse(tagged[0].source).body}
    later = "\n".join(c.source for c in code if c is not tagged[0])
    for node in ast.walk(ast.parse(later.replace("%", "#"))):  # no later cell reassigns a parameter
        if isinstance(node, ast.Assign):
            assert not {t.id for t in node.targets if isinstance(t, ast.Name)} & names


def test_notebook_runs_and_improves_held_out_loss(tmp_path, smollm2_dir):
    """papermill runs every cell; held-out loss drops; the exported model loads; metrics.json is complete."""
    out = tmp_path / "out"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "run.ipynb"), cwd=str(REPO), kernel_name="python3", progress_bar=False,
        parameters={"ACTIVATIONS_DIR": str(tmp_path / "act"), "OUTPUT_DIR": str(out), "MAX_SAMPLES": 80,
                    "EPOCHS": 2, "BATCH_TOKENS": 512, "EVAL_EVERY": 5, "GENERATE_TOKENS": 8})
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["model", "dataset", "train_tokens", "val_tokens", "context_length", "layers_trained", "dtype",
                "device", "eval_loss_before", "eval_loss_after", "ppl_before", "ppl_after", "cache_bytes"]:
        assert key in metrics, key
    assert set(metrics["phases"]) == {"embed", "peristalsis", "train", "export"}
    for p in metrics["phases"].values():
        assert p["seconds"] > 0 and p["peak_memory_bytes"] > 0 and p["peak_memory_kind"] == "peak_rss"
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.05
    assert metrics["ppl_after"] == pytest.approx(math.exp(metrics["eval_loss_after"]))
    assert metrics["cache_bytes"] == (metrics["train_tokens"] + metrics["val_tokens"]) * 576 * 2
    assert metrics["pass"]["blocks_run"] == 29
    # blocks alive: a group at a time, or one at a time over hidden states kept in RAM
    assert metrics["pass"]["max_live_blocks"] == (1 if metrics["plan"]["keep_in_ram"] else metrics["plan"]["blocks_per_pass"])
    assert metrics["pass"]["hidden_bytes_written"] == len(metrics["pass"]["groups"]) * metrics["cache_bytes"]
    assert len(metrics["activations_digest"]) == 64 and metrics["train_plan"]["total"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
