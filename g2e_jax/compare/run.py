"""``g2e-jax compare``: its config, and the run that checks the arguments, builds the parts, encodes
both sides and summarises the comparison per row, per subset and per cluster.

Live mode encodes the same rows with both (a JSONL file, or MMEB-format subsets); offline mode reads
what the official ``cli/evaluate.py`` wrote and encodes its rows with g2e_jax only (no torch); both
report per-row cosine and max abs difference, the worst rows, each side's dtype, device and rows/s,
and for MMEB subsets each side's Precision@1 and the queries whose top-1 differs.
``--official-clusters`` compares ``cli/sample_mmeb.py``'s clusters with ``g2e-jax mine``'s.
The parts come from ``parts.py``, each side's embeddings and timings from ``sides.py``.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import ml_collections
import numpy as np
from ml_collections import config_dict

from g2e_jax.compare import official as off
from g2e_jax.compare.parts import Part, Scoring, jsonl_parts, mmeb_parts, offline_parts
from g2e_jax.compare.report import Rows, precision_at_1, write_outputs
from g2e_jax.compare.sides import encode_g2e, encode_reference
from g2e_jax.config_sections import data_section, model_section, prompt_fields, prompt_section


def compare_config() -> ml_collections.ConfigDict:
    """Defaults of `g2e-jax compare` (configs/compare.py returns these)."""
    c = ml_collections.ConfigDict()
    c.model = model_section()  # model.dtype: the g2e_jax side's
    c.prompt = prompt_section()

    c.reference = ml_collections.ConfigDict()  # the PyTorch side (live mode)
    c.reference.dtype = "auto"  # auto: the same dtype as the g2e_jax side; float32 | bfloat16 | float16
    c.reference.device = "auto"  # auto: cuda when available, else cpu

    # root: an MMEB-format eval set (live MMEB mode; P@1 in offline mode). subsets empty: groups_file's,
    # else every subset under data.root (live) / in --official-dir.
    c.data = data_section("root", "image_dir", "subsets", "groups_file")
    c.subset = config_dict.placeholder(str)  # JSONL rows: a subset name, for the Matching rule
    c.limit = config_dict.placeholder(int)  # only the first N rows (JSONL) / eval rows per subset (live MMEB)

    c.max_len = 1024
    c.image_resolution = config_dict.placeholder(str)  # low | clip | mid_low | mid | mid_high | high | random
    c.batch_size = 8  # both sides
    c.timing_repeats = 0  # > 0: encode again this many times per side and report the median rows/s
    c.matmul_precision = config_dict.placeholder(str)  # g2e_jax side, e.g. "highest"; None: JAX's default
    c.worst = 10  # rows listed in the worst-rows table
    return c


def run_compare(
    cfg,
    output,
    *,
    input_path=None,
    role=None,
    official_dir=None,
    official_clusters=None,
    clusters=None,
    fail_below=None,
    progress=True,
) -> dict:
    """Runs the comparison, writes OUT/compare.{json,md,png}, returns the result dict."""
    if official_clusters is not None and clusters is None:
        raise ValueError(
            "--official-clusters needs --clusters DIR (the `g2e-jax mine` output to compare with)"
        )
    if clusters is not None and official_clusters is None:
        raise ValueError("--clusters needs --official-clusters DIR (cli/sample_mmeb.py's output)")
    embeddings = input_path is not None or official_dir is not None or cfg.data.root is not None
    if input_path is not None and official_dir is not None:
        raise ValueError("give either --input (live mode) or --official-dir (offline mode), not both")
    if input_path is not None and role is None:
        raise ValueError("--input needs --role query|document")
    if not embeddings and official_clusters is None:
        raise ValueError(
            "nothing to compare: give --input rows.jsonl, --config.data.root (live MMEB), "
            "--official-dir DIR (offline) or --official-clusters DIR"
        )
    if fail_below is not None and not embeddings:
        raise ValueError("--fail-below judges embedding cosines; cluster comparison alone has none")

    result = {
        "mode": None,
        "reference": None,
        "model": cfg.model.path,
        "prompt": _prompt_text(cfg),
        "input": None,
        "subsets": {},
        "sides": {},
    }
    rows = Rows()
    if embeddings:
        if official_dir is not None:
            parts, scorings = offline_parts(cfg, official_dir)
            result.update(
                mode="offline",
                reference=f"official files in {Path(official_dir).resolve()}",
                input=str(Path(official_dir).resolve()),
            )
            result["sides"]["official"] = {"dtype": "float32 (as saved)", "device": "–"}
        else:
            from g2e_jax.compare.reference import require_torch

            require_torch()  # before any work: fail fast with the install command
            if input_path is not None:
                parts, scorings = jsonl_parts(cfg, input_path, role), []
                result["input"] = f"{Path(input_path).resolve()} (role {role})"
            else:
                parts, scorings = mmeb_parts(cfg)
                result["input"] = f"MMEB subsets under {Path(cfg.data.root).resolve()}"
            result.update(mode="live", reference="PyTorch (transformers)")
            result["sides"]["official"] = encode_reference(cfg, parts, progress)
            gc.collect()  # the PyTorch model goes before g2e_jax loads its own
        result["sides"]["g2e_jax"] = encode_g2e(cfg, parts, progress)
        for part in parts:
            part.cos, part.diff = rows.add(part.ids, part.official, part.ours, part.texts, part.images)
        result["subsets"] = _subset_stats(parts, scorings)
    result.update(rows.summary(cfg.worst))
    if official_clusters is not None:
        result["clusters"], result["clusters_unmatched"] = _cluster_stats(official_clusters, clusters)
        if result["mode"] is None:
            result.update(
                mode="clusters",
                reference="the official cli/sample_mmeb.py clusters",
                input=f"{Path(official_clusters).resolve()} vs {Path(clusters).resolve()}",
            )
    cos = rows.cosines()
    failed = int((~(cos >= fail_below)).sum()) if fail_below is not None else 0
    result.update(
        fail_below=fail_below,
        failed_rows=failed,
        passed=failed == 0,
        config=json.loads(cfg.to_json_best_effort(sort_keys=True)),
    )
    write_outputs(output, result, rows)
    return result


def _prompt_text(cfg) -> str:
    custom = [k for k in prompt_fields(cfg.prompt) if k not in ("preset", "scheme")]
    return f"{cfg.prompt.preset}, scheme {cfg.prompt.scheme}" + (
        f" (custom {', '.join(custom)})" if custom else ""
    )


# --- per subset -----------------------------------------------------------------------------------------


def _subset_stats(parts: list[Part], scorings: list[Scoring]) -> dict:
    out: dict = {}
    for part in parts:
        if part.subset is None:
            continue
        cos, diff = part.cos, part.diff
        entry = out.setdefault(part.subset, {"rows": 0, "min_cosine": None, "max_abs_diff": None})
        entry["rows"] += len(cos)
        entry["min_cosine"] = _min(entry["min_cosine"], float(np.nanmin(cos)) if len(cos) else None)
        entry["max_abs_diff"] = max(entry["max_abs_diff"] or 0.0, float(diff.max()) if len(diff) else 0.0)
    for s in scorings:
        theirs = precision_at_1(s.queries.official, s.targets.official, s.rows)
        ours = precision_at_1(s.queries.ours, s.targets.ours, s.rows)
        out[s.queries.subset].update(
            queries=len(s.rows),
            official_precision_at_1=float((theirs == 0).mean()) if len(s.rows) else None,
            g2e_jax_precision_at_1=float((ours == 0).mean()) if len(s.rows) else None,
            top1_disagreements=int((theirs != ours).sum()),
            official_score_json_acc=None if s.official_score is None else float(s.official_score["acc"]),
        )
    return out


def _min(a, b):
    return b if a is None else a if b is None else min(a, b)


def _cluster_stats(official_dir, ours_dir) -> tuple[dict, dict]:
    theirs, ours = off.read_official_clusters(official_dir), off.read_g2e_clusters(ours_dir)
    common = [s for s in theirs if s in ours]
    if not common:
        raise ValueError(f"no subset in common: official {sorted(theirs)}, g2e-jax mine {sorted(ours)}")
    unmatched = {
        "official_only": sorted(set(theirs) - set(ours)),
        "g2e_jax_only": sorted(set(ours) - set(theirs)),
    }
    return {s: off.compare_clusters(theirs[s], _align_paths(theirs[s], ours[s])) for s in common}, unmatched


def _align_paths(theirs: list[tuple], ours: list[tuple]) -> list[tuple]:
    """The official files name images relative to MMEB's image folder, ``g2e-jax mine``'s absolutely:
    a path of ours that ends with an official path of the same query is that image."""
    by_query: dict[str, set[str]] = {}
    for cluster in theirs:
        for q, path in cluster:
            by_query.setdefault(q, set()).add(path)

    def align(key):
        q, path = key
        for rel in by_query.get(q, ()):
            if rel and (path == rel or path.replace("\\", "/").endswith("/" + rel.lstrip("./"))):
                return (q, rel)
        return key

    return [tuple(align(k) for k in cluster) for cluster in ours]
