"""``g2e-jax compare``: g2e_jax's embeddings against the official PyTorch pipeline's, on the user's rows.

Live mode encodes the same rows with both (a JSONL file, or MMEB-format subsets); offline mode reads
what the official ``cli/evaluate.py`` wrote and encodes its rows with g2e_jax only (no torch); both
report per-row cosine and max abs difference, the worst rows, each side's dtype, device and rows/s,
and for MMEB subsets each side's Precision@1 and the queries whose top-1 differs.
``--official-clusters`` compares ``cli/sample_mmeb.py``'s clusters with ``g2e-jax mine``'s.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import platform
import statistics
import time
from pathlib import Path

import ml_collections
import numpy as np
from ml_collections import config_dict

from g2e_jax.compare import official as off
from g2e_jax.compare.report import Rows, precision_at_1, write_outputs
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


@dataclasses.dataclass
class Part:
    """Rows encoded together: one role, one subset (or None), optionally the official embeddings."""

    name: str
    role: str
    subset: str | None
    ids: list[str]
    texts: list[str]
    images: list[str | None]
    official: np.ndarray | None = None  # [N, D] float32, from the files or the PyTorch side
    ours: np.ndarray | None = None  # [N, D] float32, g2e_jax
    cos: np.ndarray | None = None  # [N] per-row cosine (official, ours)
    diff: np.ndarray | None = None  # [N] per-row max abs difference


@dataclasses.dataclass
class Scoring:
    """One MMEB subset's eval rows as (query row, candidate rows) into its query and target parts."""

    queries: Part
    targets: Part
    rows: list[tuple[int, list[int]]]
    official_score: dict | None = None


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
            parts, scorings = _offline_parts(cfg, official_dir)
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
                parts, scorings = _jsonl_parts(cfg, input_path, role), []
                result["input"] = f"{Path(input_path).resolve()} (role {role})"
            else:
                parts, scorings = _mmeb_parts(cfg)
                result["input"] = f"MMEB subsets under {Path(cfg.data.root).resolve()}"
            result.update(mode="live", reference="PyTorch (transformers)")
            result["sides"]["official"] = _encode_reference(cfg, parts, progress)
            gc.collect()  # the PyTorch model goes before g2e_jax loads its own
        result["sides"]["g2e_jax"] = _encode_g2e(cfg, parts, progress)
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
    custom = [k for k in ("query_system", "document_system") if cfg.prompt[k] is not None]
    return f"{cfg.prompt.preset}, scheme {cfg.prompt.scheme}" + (
        f" (custom {', '.join(custom)})" if custom else ""
    )


# --- rows -------------------------------------------------------------------------------------------------


def _jsonl_parts(cfg, input_path, role) -> list[Part]:
    """One part: the file's rows (validated as for `g2e-jax embed`), all with ``role``."""
    from g2e_jax.data.jsonl import read_embed_rows

    if role not in ("query", "document"):
        raise ValueError(f"--role must be query or document, got {role!r}")
    rows, _ = read_embed_rows(input_path)
    rows = rows[: cfg.limit] if cfg.limit else rows
    if not rows:
        raise ValueError(f"{input_path}: no rows")
    return [
        Part(
            Path(input_path).name,
            role,
            cfg.subset,
            [r.id for r in rows],
            [r.text for r in rows],
            [r.image for r in rows],
        )
    ]


def _subsets(cfg) -> list[str]:
    """The configured subsets: ``data.subsets``, else those of ``data.groups_file`` (as ``eval``
    reads it), else none (the caller's default)."""
    if cfg.data.subsets:
        return list(cfg.data.subsets)
    if cfg.data.get("groups_file"):
        from g2e_jax.eval.mmeb import load_groups

        return list(load_groups(cfg.data.groups_file))
    return []


def _mmeb_parts(cfg) -> tuple[list[Part], list[Scoring]]:
    from g2e_jax.data.mmeb import available_subsets, read_eval

    subsets = _subsets(cfg) or available_subsets(cfg.data.root)
    if not subsets:
        raise ValueError(f"{cfg.data.root}: no subset folders")
    parts, scorings = [], []
    for subset in subsets:
        rows = read_eval(cfg.data.root, subset, image_dir=cfg.data.image_dir)
        rows = rows[: cfg.limit] if cfg.limit else rows
        q_index: dict = {}
        c_index: dict = {}
        table = []
        for r in rows:
            q = q_index.setdefault((r.qry_text, r.qry_image), len(q_index))
            table.append((q, [c_index.setdefault(k, len(c_index)) for k in zip(r.tgt_texts, r.tgt_images)]))
        queries = _part(f"{subset}_qry", "query", subset, list(q_index))
        targets = _part(f"{subset}_tgt", "document", subset, list(c_index))
        parts += [queries, targets]
        scorings.append(Scoring(queries, targets, table))
    return parts, scorings


def _part(name, role, subset, keys, official=None) -> Part:
    return Part(
        name,
        role,
        subset,
        [f"{name}#{k}" for k in range(len(keys))],
        [t for t, _ in keys],
        [im for _, im in keys],
        official,
    )


def _image_path(image_dir, value: str, where: str) -> str | None:
    """An official img_path ("" = none) as the eval reader resolves it (relative to image_dir)."""
    if not value:
        return None
    if Path(value).is_absolute():
        path = Path(value)
    elif image_dir is None:
        raise ValueError(f"{where}: image {value!r} is relative; set --config.data.image_dir")
    else:
        path = Path(image_dir) / value
    if not path.is_file():
        raise ValueError(f"{where}: image not found: {path}")
    return str(path)


def _offline_parts(cfg, official_dir) -> tuple[list[Part], list[Scoring]]:
    from g2e_jax.data.mmeb import read_eval

    available = off.official_subsets(official_dir)
    subsets = _subsets(cfg) or available
    missing = [s for s in subsets if s not in available]
    if missing:
        raise ValueError(f"{official_dir}: no {{subset}}_qry/_tgt pickles for {missing}; found {available}")
    parts, scorings = [], []
    for subset in subsets:
        sides = {}
        for side, role in (("qry", "query"), ("tgt", "document")):
            emb, keys = off.read_side(official_dir, subset, side)
            file = Path(official_dir) / f"{subset}_{side}"
            resolved = [
                (t, _image_path(cfg.data.image_dir, p, f"{file} row {i}")) for i, (t, p) in enumerate(keys)
            ]
            sides[side] = _part(f"{subset}_{side}", role, subset, resolved, emb)
        parts += [sides["qry"], sides["tgt"]]
        if cfg.data.root is None:
            continue
        q_index = {(t, im): i for i, (t, im) in enumerate(zip(sides["qry"].texts, sides["qry"].images))}
        t_index = {(t, im): i for i, (t, im) in enumerate(zip(sides["tgt"].texts, sides["tgt"].images))}
        table = []
        for i, r in enumerate(read_eval(cfg.data.root, subset, image_dir=cfg.data.image_dir)):
            key = (r.qry_text, r.qry_image)
            if key not in q_index:
                raise ValueError(
                    f"{official_dir}/{subset}_qry has no row for eval row {i}'s query {key!r}: "
                    "the official run used other data (or another image_dir)"
                )
            cands = []
            for key in zip(r.tgt_texts, r.tgt_images):
                if key not in t_index:
                    raise ValueError(
                        f"{official_dir}/{subset}_tgt has no row for eval row {i}'s candidate {key!r}"
                    )
                cands.append(t_index[key])
            table.append((q_index[(r.qry_text, r.qry_image)], cands))
        scorings.append(Scoring(sides["qry"], sides["tgt"], table, off.read_score(official_dir, subset)))
    return parts, scorings


# --- encoding -----------------------------------------------------------------------------------------


def _timed(encode_all, repeats: int) -> dict:
    """First pass (its results kept) and, with repeats, the median of further passes."""
    started = time.perf_counter()
    rows = encode_all()
    first = time.perf_counter() - started
    again = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode_all()
        again.append(time.perf_counter() - started)
    seconds = statistics.median(again) if again else first
    return {
        "first_pass_seconds": round(first, 3),
        "first_pass_rows_per_s": rows / first if first else None,
        "seconds": round(seconds, 3),
        "rows_per_s": rows / seconds if seconds else None,
        "timed_passes": len(again) or 1,
    }


def _encode_reference(cfg, parts: list[Part], progress: bool) -> dict:
    from g2e_jax.compare.reference import OfficialPrompt, TorchReference, official_prompt
    from g2e_jax.models.dtypes import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype) if cfg.reference.dtype == "auto" else cfg.reference.dtype
    prompt = official_prompt(
        cfg.prompt.preset, cfg.prompt.scheme, cfg.prompt.query_system, cfg.prompt.document_system
    )
    if cfg.model.path is None:
        raise ValueError("no model: set --config.model.path=/path/to/hf_model_dir")
    ref = TorchReference(
        cfg.model.path,
        prompt=prompt,
        dtype=dtype,
        device=cfg.reference.device,
        adapter=cfg.model.adapter,
        max_len=cfg.max_len,
        image_resolution=cfg.image_resolution,
        batch_size=cfg.batch_size,
    )

    def encode_all():
        for part in parts:
            query = OfficialPrompt.uses_query_template(part.role, part.subset)
            part.official = ref.encode(
                part.texts, part.images, query_template=query, progress=progress, desc=f"PyTorch {part.name}"
            )
        return sum(len(p.ids) for p in parts)

    timing = _timed(encode_all, cfg.timing_repeats)
    device = ref.device
    if device.startswith("cuda"):
        device = f"{device} ({ref.torch.cuda.get_device_name()})"
    else:
        device = f"cpu ({ref.torch.get_num_threads()} threads, {platform.machine()})"
    return {"dtype": dtype, "device": device, "framework": f"torch {ref.torch.__version__}", **timing}


def _embedder(cfg):
    """The g2e_jax Embedder of the config (model.adapter passed on when from_pretrained takes it)."""
    from g2e_jax.embed import Embedder

    if cfg.model.path is None:
        raise ValueError("no model: set --config.model.path=/path/to/hf_model_dir")
    prompt = prompt_fields(cfg.prompt)
    kwargs = {
        "dtype": cfg.model.dtype,
        "prompt": prompt,
        "scheme": cfg.prompt.scheme,
        "max_len": cfg.max_len,
        "image_resolution": cfg.image_resolution,
        "batch_size": cfg.batch_size,
        "progress": False,
    }
    if cfg.model.adapter is not None:
        if "adapter" not in inspect.signature(Embedder.from_pretrained).parameters:
            raise ValueError(
                "--config.model.adapter: this g2e_jax's Embedder.from_pretrained takes no adapter"
            )
        kwargs["adapter"] = cfg.model.adapter
    return Embedder.from_pretrained(cfg.model.path, **kwargs)


def _encode_g2e(cfg, parts: list[Part], progress: bool) -> dict:
    import contextlib

    import jax

    embedder = _embedder(cfg)

    def encode_all():
        for part in parts:
            part.ours = embedder.encode(
                part.texts, part.images, role=part.role, subset=part.subset, progress=progress
            )
        return sum(len(p.ids) for p in parts)

    precision = cfg.matmul_precision
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        timing = _timed(encode_all, cfg.timing_repeats)
    dev = jax.devices()[0]
    device = f"{dev.platform} ({dev.device_kind}) x{jax.device_count()}"
    info = {
        "dtype": embedder.dtype,
        "device": device,
        "framework": f"jax {jax.__version__}",
        "matmul_precision": precision or "default",
        **timing,
    }
    return info


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
