"""Rewrite README's result tables from bench/results/*.json, so that no number in README is typed by hand.

python bench/update_readme.py [--default-run output/smollm2-stdlib/metrics.json]
  --default-run copies that metrics.json to bench/results/default_run.json first.
"""
import argparse
import importlib.util
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def gib(n: float) -> str:
    """Bytes -> '1.23 GiB'."""
    return f"{n / 2**30:.2f} GiB"


def default_run_table(m: dict) -> str:
    """The default notebook run: data, losses, time and peak memory of each phase."""
    rows = [
        ("model / data", f"{m['model']} / {m['dataset']}"),
        ("device, compute dtype", f"{m['device']}, {m['dtype']}"),
        ("train / held-out tokens", f"{m['train_tokens']:,} / {m['val_tokens']:,}"),
        ("held-out loss before -> after", f"{m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}"),
        ("held-out perplexity before -> after", f"{m['ppl_before']:.2f} -> {m['ppl_after']:.2f}"),
        ("hidden-state cache", f"{m['cache_bytes'] / 2**20:.1f} MiB"),
        ("blocks per pass (plan)", f"{m['plan']['blocks_per_pass']} of {m['plan']['blocks_to_run']}, "
                                   f"{'in RAM' if m['plan']['keep_in_ram'] else 'on disk'}"),
    ]
    planned = {"embed": m["plan"].get("peak_memory_embed"), "peristalsis": m["plan"].get("peak_memory_pass"),
               "train": m.get("train_plan", {}).get("total")}
    rows += [(f"{name}: seconds, peak memory ({p['peak_memory_kind']})",
              f"{p['seconds']:.0f} s, {gib(p['peak_memory_bytes'])}" + (f" (planned {gib(planned[name])})" if planned.get(name) else ""))
             for name, p in m["phases"].items()]
    if "total_seconds" in m:
        rows.append(("whole notebook", f"{m['total_seconds']:.0f} s"))
    out = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    for g in m.get("generations", [])[:2]:
        out += f"\n> **Q:** {g['prompt']}\n> **before:** {g['before']}\n> **after:** {g['after']}\n"
    return out


def bench_table(name: str, results: dict) -> str:
    """A benchmark's own `markdown_table(results)` from bench/NAME.py."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown_table(results)


def replace(readme: str, key: str, body: str) -> str:
    """Put body between <!-- table:key --> and <!-- /table -->."""
    pattern = re.compile(rf"(<!-- table:{key} -->\n).*?(<!-- /table -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), readme)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--default-run", type=Path)
    args = ap.parse_args()
    if args.default_run:
        shutil.copy(args.default_run, RESULTS / "default_run.json")
    readme = (ROOT / "README.md").read_text()
    for key in ["default_run", "peristalsis", "gpu_plan", "memory"]:
        path = RESULTS / f"{key}.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        body = default_run_table(results) if key == "default_run" else bench_table(key, results)
        readme = replace(readme, key, body)
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()
