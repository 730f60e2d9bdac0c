"""``g2e-jax mine``: SaHa clusters for every training subset, from the zero-shot model.

Per subset: read the MMEB-train rows of ``mine.split``, deduplicate queries and positives, encode
them with the Embedder at the ``mine`` settings (cached on disk in chunks: an interrupted run resumes
without re-encoding), search the nearest positives, mine, and write
``<output>/<subset>/original.jsonl`` (anchor row + ``neg_samples``) and ``stats.json``. The cluster
file keeps the name ``original`` (the split the train readers take) whatever split it was mined
from; its rows carry that split's instructions, which training then sees, as in the official run.

Multi-host (``--config.distributed.*``, the launchers of ``train``): every process encodes its share
of the rows, the exact search is sharded over every device, every process mines the same
clusters, and process 0 writes the cache and the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from ml_collections import config_dict

from g2e_jax import distributed
from g2e_jax.data.clusters import write_clusters
from g2e_jax.data.mmeb import TrainRow, read_train
from g2e_jax.io import write_atomic
from g2e_jax.paths import absolute
from g2e_jax.saha import MiningStats, mine_clusters, nearest

# The reference's "already labeled" subsets: owners keep retrieval order (no false-negative sort).
CLASSIFICATION_SUBSETS = ("ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                          "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")  # fmt: skip

MMEB_TRAIN_SUBSETS = ("ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA",
                      "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i",
                      "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA", "MSCOCO")  # fmt: skip


def mine_section() -> ml_collections.ConfigDict:
    """The ``mine`` part of a SaHa config: the official ``cli.sample_mmeb`` settings (top_k 15,
    pool_mult 3, the ``diverse_instruction`` rows, max length 2048, ``random`` images, batches of
    16). Mining encodes with these, not with the training's ``max_len`` / ``image_resolution``."""
    c = ml_collections.ConfigDict()
    c.top_k = 15
    c.pool_mult = 3
    c.split = "diverse_instruction"  # MMEB-train split the clusters are mined from (and trained on)
    c.max_len = 2048
    c.image_resolution = config_dict.FieldReference("random", field_type=str)  # None: native size
    c.batch_size = 16  # encode batch
    c.classification_subsets = CLASSIFICATION_SUBSETS
    c.output_dir = config_dict.placeholder(str)  # clusters, stats and the embedding cache
    c.encode_chunk = 4096  # rows per cached embedding chunk (unit of resume)
    return c


def _unique(keys) -> tuple[list, np.ndarray]:
    index: dict = {}
    rows = np.array([index.setdefault(k, len(index)) for k in keys], np.int64)
    return list(index), rows


def _raw_row(row: TrainRow) -> dict:
    """The row as MMEB-train fields again, with absolute image paths: a cluster file is read from any
    working directory, and MMEB readers that join ``image_dir`` with a path keep an absolute one as is."""

    def image(path):
        return "" if path is None else absolute(path)

    return {
        "qry": row.qry,
        "qry_image_path": image(row.qry_image),
        "pos_text": row.pos_text,
        "pos_image_path": image(row.pos_image),
        "neg_text": row.neg_text,
        "neg_image_path": image(row.neg_image),
    }


def mine_subset(embedder, rows: list[TrainRow], subset: str, cfg, *, progress=True):
    """Clusters and stats of one subset (embeddings cached under ``cfg.mine.output_dir/cache``)."""
    queries, row_query = _unique((r.qry, r.qry_image) for r in rows)
    positives, row_positive = _unique((r.pos_text, r.pos_image) for r in rows)
    cache = Path(cfg.mine.output_dir) / "cache"
    started = time.perf_counter()
    query_emb, q_cached = embedder.encode_cached(
        [t for t, _ in queries], [im for _, im in queries], role="query", subset=subset, cache_dir=cache,
        name=f"{subset}-queries", chunk=cfg.mine.encode_chunk, progress=progress,
    )  # fmt: skip
    cand_emb, c_cached = embedder.encode_cached(
        [t for t, _ in positives], [im for _, im in positives], role="document", subset=subset, cache_dir=cache,
        name=f"{subset}-positives", chunk=cfg.mine.encode_chunk, progress=progress,
    )  # fmt: skip
    encode_seconds = time.perf_counter() - started
    top_k, pool_mult = cfg.mine.top_k, cfg.mine.pool_mult
    started = time.perf_counter()
    _, neighbours = nearest(query_emb, cand_emb, 2 * top_k * pool_mult)
    stats = MiningStats()
    clusters = mine_clusters(
        row_query, row_positive, query_emb, cand_emb, top_k=top_k, pool_mult=pool_mult,
        classification=subset in cfg.mine.classification_subsets, neighbours=neighbours, stats=stats,
    )  # fmt: skip
    info = {
        "subset": subset, "rows": len(rows), "unique_queries": len(queries), "unique_positives": len(positives),
        "classification": subset in cfg.mine.classification_subsets, **stats.to_json(),
        "encode_seconds": round(encode_seconds, 2), "embeddings_from_cache": bool(q_cached and c_cached),
        "mine_seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    if distributed.is_lead():
        out = Path(cfg.mine.output_dir) / subset
        out.mkdir(parents=True, exist_ok=True)
        write_clusters(out / "original.jsonl", clusters, [_raw_row(r) for r in rows])
        write_atomic(out / "stats.json", json.dumps(info, indent=2) + "\n")
    return clusters, info


def mine_encode_config(cfg) -> ml_collections.ConfigDict:
    """``cfg`` with its encode settings (``max_len``, ``image_resolution``, ``batch_size``) replaced by
    the ``mine`` ones, for ``Embedder.from_config``: a SaHa config's top-level values are training's."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        for key in ("max_len", "image_resolution", "batch_size"):
            c[key] = cfg.mine[key]
    return c


def run_mine(cfg) -> dict:
    """``g2e-jax mine``: every subset of ``cfg.data.subsets`` (rows of ``mine.split``, encoded with
    ``mine.max_len`` / ``mine.image_resolution`` / ``mine.batch_size``); returns {subset: stats}."""
    from g2e_jax.embed import Embedder

    if cfg.data.root is None:
        raise ValueError("no data: set --config.data.root=/path/to/MMEB-train")
    if cfg.mine.output_dir is None:
        raise ValueError("no output: set --config.mine.output_dir=DIR")
    from g2e_jax.check_data import check_before_run

    distributed.init_distributed(cfg)
    lead = distributed.is_lead()
    check_before_run(cfg, "mine", source="mmeb", split=cfg.mine.split)
    embedder = Embedder.from_config(mine_encode_config(cfg))
    summary = {}
    for k, subset in enumerate(cfg.data.subsets, start=1):
        rows = read_train(cfg.data.root, subset, cfg.mine.split, image_dir=cfg.data.image_dir)
        if lead:
            print(f"[mine {k}/{len(cfg.data.subsets)}] {subset}: {len(rows)} rows", flush=True)
        _, info = mine_subset(embedder, rows, subset, cfg, progress=lead)
        summary[subset] = info
        if lead:
            print(f"[mine {k}/{len(cfg.data.subsets)}] {subset}: {info['clusters']} clusters ({info['phase2_clusters']} "
                  f"in phase 2), recall@1 {info['recall'].get('recall@1', float('nan')):.3f}", flush=True)  # fmt: skip
    meta = {"prompt": dataclasses.asdict(embedder.prompt), "model_path": absolute(embedder.model_path),
            "top_k": cfg.mine.top_k, "pool_mult": cfg.mine.pool_mult, "split": cfg.mine.split,
            "max_len": embedder.max_len, "image_resolution": cfg.mine.image_resolution,
            "subsets": summary}  # fmt: skip
    if lead:
        write_atomic(Path(cfg.mine.output_dir) / "stats.json", json.dumps(meta, indent=2) + "\n")
    return summary
