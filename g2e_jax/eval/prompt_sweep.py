"""``g2e-jax eval-prompts``: the paper's prompt ablation, ``g2e-jax eval`` once per prompt preset on
the same weights, reported as one table (one column per preset).

The model is loaded once; each preset re-renders the template around the same tokenised content
(``Embedder.with_prompt``), and candidate embeddings are cached per preset under ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from g2e_jax.eval.mmeb import MMEB_GROUPS, eval_config, evaluate_mmeb, load_groups, write_report
from g2e_jax.prompts import ABLATION, get_prompt


def sweep_config() -> ml_collections.ConfigDict:
    """``g2e-jax eval``'s fields (configs/mmeb_eval.py) plus ``presets``: the columns of the table."""
    c = eval_config()
    c.presets = ABLATION  # any names of g2e_jax.prompts.PRESETS (or its aliases), in column order
    return c


def run_prompt_sweep(cfg) -> dict[str, dict]:
    """Evaluates every preset of ``cfg.presets`` and writes ``results.json`` / ``results.md`` /
    ``results.png`` to ``cfg.output_dir``; returns ``{preset: run_eval-like results}``."""
    from g2e_jax.embed import Embedder

    if cfg.data.root is None:
        raise ValueError("no data: set --config.data.root=/path/to/MMEB-eval")
    if cfg.output_dir is None:
        raise ValueError("no output: set --config.output_dir=DIR")
    presets = list(cfg.presets)
    if not presets:
        raise ValueError("no presets: set --config.presets=\"('plain', 'hierarchical')\"")
    if len(set(presets)) != len(presets):
        raise ValueError(f"presets repeat a name: {presets}")
    for name in presets:
        get_prompt(name)  # unknown names fail before the model loads
    if cfg.prompt.query_system is not None or cfg.prompt.document_system is not None:
        raise ValueError(
            "prompt.query_system / document_system would override every preset's system level; "
            "leave them unset in a prompt sweep"
        )
    groups = MMEB_GROUPS if cfg.data.groups_file is None else load_groups(cfg.data.groups_file)
    embedder = Embedder.from_config(cfg)
    cache_dir = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")
    runs = {}
    for name in presets:
        print(f"[eval-prompts] preset {name!r}", flush=True)
        preset = embedder.with_prompt(name, scheme=cfg.prompt.scheme)
        result = evaluate_mmeb(
            preset,
            cfg.data.root,
            list(cfg.subsets),
            image_dir=cfg.data.image_dir,
            groups=groups,
            cache_dir=cache_dir,
        )
        result["model_path"] = str(embedder.model_path)
        result["prompt"] = dataclasses.asdict(preset.prompt)
        runs[name] = result
    write_report(runs, cfg.output_dir)
    return runs
