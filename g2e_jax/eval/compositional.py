"""``g2e-jax eval-sugarcrepe`` and ``g2e-jax eval-sugarcrepe-pp``: the compositional benchmarks as
commands, reported like ``g2e-jax eval`` (``results.json``, ``results.md``, ``results.png``).

Both read ``configs/sugarcrepe.py``: the model and prompt fields every embedding job shares, the data
folder (one ``<subset>.json`` per subset) and the image folder (COCO val2017 for the real sets).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import numpy as np
from ml_collections import config_dict

from g2e_jax import plots
from g2e_jax.config_sections import data_section, model_section, prompt_section
from g2e_jax.eval import sugarcrepe as sc
from g2e_jax.io import write_atomic

BENCHMARKS = {"sugarcrepe": "SugarCrepe", "sugarcrepe_pp": "SugarCrepe++"}


def sugarcrepe_config() -> ml_collections.ConfigDict:
    """Defaults of `g2e-jax eval-sugarcrepe` / `eval-sugarcrepe-pp` (configs/sugarcrepe.py returns these)."""
    c = ml_collections.ConfigDict()
    c.model = model_section(adapter=False)
    c.prompt = prompt_section()

    c.data = data_section("dir", "image_dir")  # image_dir: the images the items name (COCO val2017)
    c.subsets = ()  # empty: every subset of the benchmark
    c.output_dir = config_dict.placeholder(str)  # results.json / results.md / results.png
    c.max_len = 1024
    c.image_resolution = config_dict.placeholder(str)
    c.batch_size = 8
    return c


def run_sugarcrepe(cfg, benchmark: str) -> dict:
    """Evaluates ``benchmark`` ("sugarcrepe" or "sugarcrepe_pp") and writes the report to
    ``cfg.output_dir``; returns what ``results.json`` holds."""
    from g2e_jax.embed import Embedder

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)}")
    required = {"data.dir": cfg.data.dir, "data.image_dir": cfg.data.image_dir, "output_dir": cfg.output_dir}
    for field, value in required.items():
        if value is None:
            raise ValueError(f"no {field}: set --config.{field}=DIR")
    subsets = list(cfg.subsets) or None
    if benchmark == "sugarcrepe":  # check the data before loading the model
        sc.load_sugarcrepe(cfg.data.dir, cfg.data.image_dir, subsets or sc.SUBSETS)
    else:
        sc.load_sugarcrepe_pp(cfg.data.dir, cfg.data.image_dir, subsets)
    embedder = Embedder.from_config(cfg)
    if benchmark == "sugarcrepe":
        scores = sc.evaluate_sugarcrepe(embedder, cfg.data.dir, cfg.data.image_dir, subsets or sc.SUBSETS)
        results = {"benchmark": benchmark, **scores}
    else:
        scores = sc.evaluate_sugarcrepe_pp(embedder, cfg.data.dir, cfg.data.image_dir, subsets)
        results = {"benchmark": benchmark, "subsets": scores, "average": sc.pp_average(scores)}
    results["model_path"] = str(embedder.model_path)
    results["prompt"] = dataclasses.asdict(embedder.prompt)
    write_results(results, cfg.output_dir)
    return results


def write_results(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """``results.json`` (as returned), ``results.md`` (the benchmark's table), ``results.png`` (bars)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    write_atomic(paths["json"], json.dumps(results, indent=2) + "\n")
    if results["benchmark"] == "sugarcrepe":
        markdown = sc.sugarcrepe_markdown(results)
        bars = {"accuracy": {s: 100 * r["accuracy"] for s, r in results["subsets"].items()}}
    else:
        markdown = sc.sugarcrepe_pp_markdown(results["subsets"])
        bars = {
            key: {s: r[key] for s, r in results["subsets"].items()} for key in ("image_to_text", "text_only")
        }
    write_atomic(paths["markdown"], markdown)
    _bar_chart(bars, paths["plot"], f"{BENCHMARKS[results['benchmark']]} accuracy")
    return paths


def _bar_chart(bars: dict[str, dict[str, float]], path: Path, title: str) -> None:
    subsets = list(next(iter(bars.values())))
    series = {
        f"{name.replace('_', '-')} (mean {np.mean(list(values.values())):.1f})": [values[s] for s in subsets]
        for name, values in bars.items()
    }
    plots.grouped_bars(
        series, subsets, path, title=title, ylabel="accuracy (%)", inch_per_group=0.9, rotation=30
    )


