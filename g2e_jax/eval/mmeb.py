"""MMEB evaluation: Precision@1 per subset, averaged per category, IND / OOD and overall.

Per subset, queries are encoded with the query template and the deduplicated union of all rows'
candidates once with the document template (query template for Matching subsets). A query is
correct when its highest-scoring candidate is its first one (``argmax == 0``; as in the reference
scorer, an exact tie with candidate 0 counts as correct). Candidate embeddings are cached on disk
per (weights, prompt, settings, candidate list), so re-running an evaluation is cheap.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import numpy as np
from ml_collections import config_dict

from g2e_jax import distributed, plots
from g2e_jax.config_sections import data_section, distributed_section, model_section, prompt_section
from g2e_jax.data.mmeb import EvalRow, read_eval
from g2e_jax.io import write_atomic
from g2e_jax.paths import absolute

CATEGORIES = ("Classification", "VQA", "Retrieval", "Grounding")

# subset -> (category, split): the 36 MMEB subsets, in-distribution (IND) or out-of-distribution (OOD).
MMEB_GROUPS: dict[str, tuple[str, str]] = {
    **{s: ("Classification", "IND") for s in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")},
    **{s: ("Classification", "OOD") for s in ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{s: ("VQA", "IND") for s in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    **{s: ("VQA", "OOD") for s in ("ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{s: ("Retrieval", "IND") for s in ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i",
                                         "MSCOCO_i2t", "NIGHTS", "WebQA")},
    **{s: ("Retrieval", "OOD") for s in ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    "MSCOCO": ("Grounding", "IND"),
    **{s: ("Grounding", "OOD") for s in ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}  # fmt: skip


def eval_config(preset: str = "hierarchical") -> ml_collections.ConfigDict:
    """Defaults of `g2e-jax eval` (configs/mmeb_eval.py returns these): the official evaluation
    settings; ``model.dtype`` "auto" is the official bf16 on GPU/TPU. ``prompt.scheme`` is the
    preset's ("mrope" for qwen3_vl_embedding)."""
    from g2e_jax.prompts import get_prompt

    prompt = get_prompt(preset)  # configs/mmeb_eval.py:NAME: a typo is an error here, not at encode time
    c = ml_collections.ConfigDict()
    c.model = model_section(shard_weights=True)
    c.prompt = prompt_section(preset, scheme=prompt.scheme)
    c.data = data_section("root", "image_dir", "groups_file")  # root: the test split
    c.subsets = ()  # (): every subset of the groups table (the 36 of MMEB, or those of data.groups_file)

    c.output_dir = config_dict.placeholder(str)  # results.json / results.md / results.png
    c.cache_dir = config_dict.placeholder(str)  # candidate-embedding cache; None: <output_dir>/cache
    # The official cli.evaluate settings (--max_len 2048 --image_resolution random), zero-shot and fine-tuned.
    c.max_len = 2048
    c.image_resolution = config_dict.FieldReference("random", field_type=str)  # None: native size
    c.batch_size = 8  # rows per batch over all devices
    c.dim = config_dict.placeholder(int)  # Matryoshka: keep the first dim coordinates, re-normalised
    c.min_pixels = config_dict.placeholder(int)  # image pixel bounds; None: preprocessor_config.json's
    c.max_pixels = config_dict.placeholder(int)
    c.distributed = distributed_section()  # multi-host, as in `g2e-jax train`
    return c


def candidate_union(rows: list[EvalRow]) -> tuple[list[tuple[str, str | None]], np.ndarray]:
    """Distinct (text, image) candidates over all rows, and each row's candidate indices."""
    index: dict[tuple[str, str | None], int] = {}
    per_row = []
    for row in rows:
        per_row.append(
            [index.setdefault((t, im), len(index)) for t, im in zip(row.tgt_texts, row.tgt_images)]
        )
    width = max(len(r) for r in per_row)
    table = np.full((len(rows), width), -1, np.int64)
    for i, r in enumerate(per_row):
        table[i, : len(r)] = r
    return list(index), table


def precision_at_1(
    query_emb: np.ndarray, cand_emb: np.ndarray, table: np.ndarray
) -> tuple[float, np.ndarray]:
    """Share of queries whose best candidate is their candidate 0; also each query's prediction."""
    scores = np.einsum("qd,qkd->qk", query_emb, cand_emb[np.maximum(table, 0)])
    scores = np.where(table >= 0, scores, -np.inf)
    pred = scores.argmax(-1)
    return float((pred == 0).mean()), pred


def summarize(scores: dict[str, float], groups: dict[str, tuple[str, str]]) -> dict:
    """Subset scores -> per category, IND, OOD and overall means (each over the subsets present)."""

    def mean(names):
        values = [scores[n] for n in names]
        return float(np.mean(values)) if values else None

    unknown = sorted(set(scores) - set(groups))
    if unknown:
        raise ValueError(f"subsets without a category/split in the groups table: {unknown}")
    out = {"categories": {}, "count": len(scores)}
    for category in CATEGORIES:
        names = [n for n in scores if groups[n][0] == category]
        if names:
            out["categories"][category] = mean(names)
    out["IND"] = mean([n for n in scores if groups[n][1] == "IND"])
    out["OOD"] = mean([n for n in scores if groups[n][1] == "OOD"])
    out["overall"] = mean(list(scores))
    return out


def evaluate_subset(embedder, rows: list[EvalRow], subset: str, *, cache_dir=None, progress=True) -> dict:
    candidates, table = candidate_union(rows)
    texts, images = [t for t, _ in candidates], [im for _, im in candidates]
    if cache_dir is None:
        cand_emb, cached = (
            embedder.encode(texts, images, role="document", subset=subset, progress=progress),
            False,
        )
    else:
        cand_emb, cached = embedder.encode_cached(
            texts, images, role="document", subset=subset, cache_dir=cache_dir, name=f"{subset}-candidates",
            chunk=max(1, len(candidates)), progress=progress,
        )  # fmt: skip
    query_emb = embedder.encode(
        [r.qry_text for r in rows], [r.qry_image for r in rows], role="query", progress=progress
    )
    score, pred = precision_at_1(query_emb, cand_emb, table)
    return {"precision_at_1": score, "queries": len(rows), "candidates": len(candidates), "cached": cached,
            "predictions": pred.tolist()}  # fmt: skip


def evaluate_mmeb(embedder, data_root, subsets, *, image_dir=None, groups=None, cache_dir=None,
                  progress=True) -> dict:  # fmt: skip
    """Scores every subset; returns {"subsets": {name: {...}}, "summary": summarize(...)}."""
    groups = MMEB_GROUPS if groups is None else groups
    missing = [s for s in subsets if s not in groups]
    if missing:
        raise ValueError(f"subsets without a category/split in the groups table: {missing}")
    per_subset = {}
    for subset in subsets:
        rows = read_eval(data_root, subset, image_dir=image_dir)
        if progress and distributed.is_lead():
            print(f"[eval] {subset}: {len(rows)} queries", flush=True)
        per_subset[subset] = evaluate_subset(embedder, rows, subset, cache_dir=cache_dir, progress=progress)
    summary = summarize({s: r["precision_at_1"] for s, r in per_subset.items()}, groups)
    return {"subsets": per_subset, "summary": summary, "groups": {s: list(groups[s]) for s in subsets}}


# --- reporting --------------------------------------------------------------------------------------------


def markdown_table(runs: dict[str, dict]) -> str:
    """One column per run (e.g. the plain and hierarchical prompts); scores in percent."""
    names = list(runs)
    first = runs[names[0]]
    lines = ["| Subset | Category | Split | " + " | ".join(names) + " |",
             "|---|---|---|" + "---:|" * len(names)]  # fmt: skip
    for subset, (category, split) in first["groups"].items():
        cells = [f"{100 * runs[n]['subsets'][subset]['precision_at_1']:.1f}" for n in names]
        lines.append(f"| {subset} | {category} | {split} | " + " | ".join(cells) + " |")
    lines += ["", "| Average | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    rows = [(c, lambda r, c=c: r["summary"]["categories"].get(c)) for c in CATEGORIES]
    rows += [(k, lambda r, k=k: r["summary"][k]) for k in ("IND", "OOD", "overall")]
    for label, get in rows:
        values = [get(runs[n]) for n in names]
        if all(v is None for v in values):
            continue
        lines.append(
            f"| {label} | " + " | ".join("–" if v is None else f"{100 * v:.1f}" for v in values) + " |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(runs: dict[str, dict], path: Path, title: str = "MMEB Precision@1") -> None:
    """Each run's Precision@1 per subset, its overall mean in the legend."""
    subsets = list(runs[next(iter(runs))]["groups"])
    series = {
        f"{name} (overall {100 * r['summary']['overall']:.1f})": [
            100 * r["subsets"][s]["precision_at_1"] for s in subsets
        ]
        for name, r in runs.items()
    }
    plots.grouped_bars(
        series, subsets, path, title=title, ylabel="Precision@1 (%)", inch_per_group=0.5, rotation=45
    )


def write_report(runs: dict[str, dict], out_dir: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``results.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    slim = {n: {**r, "subsets": {s: {k: v for k, v in d.items() if k != "predictions"} for s, d in r["subsets"].items()}}
            for n, r in runs.items()}  # fmt: skip
    write_atomic(paths["json"], json.dumps(slim, indent=2))
    write_atomic(paths["markdown"], markdown_table(runs))
    bar_chart(runs, paths["plot"])
    return paths


def load_groups(path) -> dict[str, tuple[str, str]]:
    """A ``{subset: {"category": ..., "split": "IND"|"OOD"}}`` file (e.g. the synthetic set's)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: groups file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    groups = {}
    for subset, info in raw.items():
        category, split = info.get("category"), info.get("split")
        if category not in CATEGORIES or split not in ("IND", "OOD"):
            raise ValueError(f"{path}: subset {subset!r} needs a category in {CATEGORIES} and split IND or OOD, "
                             f"got {info!r}")  # fmt: skip
        groups[subset] = (category, split)
    return groups


def run_eval(cfg) -> dict:
    """``g2e-jax eval``: evaluate, then write the report to ``cfg.output_dir``."""
    from g2e_jax.embed import Embedder

    if cfg.data.root is None:
        raise ValueError("no data: set --config.data.root=/path/to/MMEB-eval")
    if cfg.output_dir is None:
        raise ValueError("no output: set --config.output_dir=DIR")
    groups = MMEB_GROUPS if cfg.data.groups_file is None else load_groups(cfg.data.groups_file)
    distributed.init_distributed(cfg)
    embedder = Embedder.from_config(cfg)
    cache_dir = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")
    subsets = list(cfg.subsets) or list(groups)
    results = evaluate_mmeb(embedder, cfg.data.root, subsets, image_dir=cfg.data.image_dir,
                            groups=groups, cache_dir=cache_dir, progress=distributed.is_lead())  # fmt: skip
    results["model_path"] = absolute(embedder.model_path)
    results["prompt"] = dataclasses.asdict(embedder.prompt)
    if distributed.is_lead():  # every process holds the same results; one writes them
        write_report({embedder.prompt.name: results}, cfg.output_dir)
    return results
