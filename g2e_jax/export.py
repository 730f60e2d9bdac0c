"""``g2e-jax embed``: a JSONL file of rows -> ``embeddings.npy`` + ``ids.txt`` + ``meta.json``.

Work is cut into shards of ``shard_size`` rows, each written atomically under ``DIR/shards/``; an
interrupted run restarted with ``--resume`` keeps the finished shards (after checking that the
input and the settings are the same) and recomputes nothing else.

Multi-host (``--config.distributed.*``): every process encodes its share of each shard; process 0
keeps the job record and the shards and writes the outputs, so a run can resume on another
number of processes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from importlib import metadata
from pathlib import Path

import ml_collections
import numpy as np
from ml_collections import config_dict
from tqdm.auto import tqdm

from g2e_jax import distributed
from g2e_jax.config_sections import distributed_section, model_section, prompt_section
from g2e_jax.config_utils import config_to_json
from g2e_jax.data.jsonl import BadRow, bad_rows_error, read_embed_rows
from g2e_jax.embed import Embedder, InputError
from g2e_jax.io import save_npy_atomic, sha256_file, write_atomic
from g2e_jax.paths import absolute_config_paths
from g2e_jax.prompts import plural


def embed_config() -> ml_collections.ConfigDict:
    """Defaults of `g2e-jax embed` (configs/embed.py returns these; override with --config.a.b=v)."""
    c = ml_collections.ConfigDict()
    c.model = model_section(shard_weights=True)
    c.prompt = prompt_section()

    c.instruction = config_dict.placeholder(str)  # task instruction (qwen3_vl_embedding: the system turn)
    c.subset = config_dict.placeholder(str)  # e.g. "RefCOCO-Matching": applies the Matching rule
    c.max_len = 1024
    c.dim = config_dict.placeholder(int)  # Matryoshka: keep the first dim coordinates, re-normalised
    c.min_pixels = config_dict.placeholder(int)  # image pixel bounds; None: preprocessor_config.json's
    c.max_pixels = config_dict.placeholder(int)
    c.image_resolution = config_dict.placeholder(str)  # low | clip | mid_low | mid | mid_high | high | random
    c.batch_size = 8  # rows per batch over all devices
    c.shard_size = 512  # rows per checkpointed shard (unit of --resume)
    c.distributed = distributed_section()  # multi-host, as in `g2e-jax train`
    return c


PACKAGES = ("g2e_jax", "jax", "jaxlib", "flax", "numpy", "transformers", "tokenizers", "pillow")


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_embed(cfg, input_path: str | Path, output_dir: str | Path, *, role: str, resume: bool = False,
              skip_bad: bool = False) -> dict:  # fmt: skip
    """Runs the export; returns the meta dict also written to ``meta.json``."""
    if role not in ("query", "document"):
        raise ValueError(f"--role must be query or document, got {role!r}")
    input_path, out = Path(input_path), Path(output_dir)
    distributed.init_distributed(cfg)
    lead = distributed.is_lead()
    rows, bad = read_embed_rows(input_path, skip_bad=True)  # every parse error at once
    embedder = Embedder.from_config(cfg)
    if bad and not skip_bad:
        raise bad_rows_error(input_path, bad + _check_rows(embedder, rows, role, cfg))
    model_path = embedder.model_path
    config = json.loads(config_to_json(absolute_config_paths(cfg)))
    config.pop("distributed", None)  # a run may resume on another number of processes
    job = {
        "input": str(input_path.resolve()),
        "input_sha256": sha256_file(input_path),
        "role": role,
        "skip_bad": skip_bad,
        "config": config,
    }
    shard_dir = out / "shards"
    shard_size = int(cfg.shard_size)
    # Process 0 checks the job and says which shards are done; the others follow (or stop with it).
    done, problem = _check_job(out, job, resume, rows, shard_size) if lead else ([], None)
    status = distributed.broadcast(np.array([problem is not None, len(done)], np.int32))
    if status[0]:
        raise ValueError(problem or "process 0 refused the export (see its error)")
    shard_done = distributed.broadcast(np.array(done if lead else [0] * int(status[1]), np.int32))

    starts = range(0, len(rows), shard_size)
    embeddings, ids, skipped = [], [], list(bad)
    reused = 0
    bar = tqdm(
        total=len(rows), desc=f"embedding {plural(role)}", unit="row", dynamic_ncols=True, disable=not lead
    )
    started = time.perf_counter()
    for k, start in enumerate(starts):
        chunk = rows[start : start + shard_size]
        shard_npy, shard_json = shard_dir / f"{k:05d}.npy", shard_dir / f"{k:05d}.json"
        if shard_done[k]:
            if lead:
                info = json.loads(shard_json.read_text())
                embeddings.append(np.load(shard_npy))
                ids += info["ids"]
                skipped += [BadRow(**b) for b in info["skipped"]]
            reused += len(chunk)
            bar.update(len(chunk))
            continue
        emb, shard_ids, shard_bad = _embed_chunk(embedder, chunk, role, cfg)
        if shard_bad and not skip_bad:  # name every bad row of the file in one error
            rest = rows[start + shard_size :]
            raise bad_rows_error(input_path, shard_bad + _check_rows(embedder, rest, role, cfg))
        if lead:
            save_npy_atomic(shard_npy, emb)
            shard_info = {
                "lines": [r.line for r in chunk],
                "ids": shard_ids,
                "skipped": [b.to_json() for b in shard_bad],
            }
            write_atomic(shard_json, json.dumps(shard_info))
        embeddings.append(emb)
        ids += shard_ids
        skipped += shard_bad
        bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - started
    if not lead:  # process 0 writes the outputs
        return {"rows": len(ids), "skipped": len(skipped), "dim": embedder.dim, "resumed_rows": reused}

    matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, embedder.dim), np.float32)
    assert matrix.shape[0] == len(ids)
    save_npy_atomic(out / "embeddings.npy", matrix.astype(np.float32))
    write_atomic(out / "ids.txt", "".join(f"{i}\n" for i in ids))
    skipped.sort(key=lambda b: b.line)
    write_atomic(out / "skipped.jsonl", "".join(json.dumps(b.to_json()) + "\n" for b in skipped))
    meta = {
        "model_path": str(model_path.resolve()),
        "weights_sha256": embedder.weights_id,
        "dtype": embedder.dtype,
        "prompt": dataclasses.asdict(embedder.prompt),
        "scheme": embedder.prompt.scheme,
        "role": role,
        "max_len": cfg.max_len,
        "image_resolution": cfg.image_resolution,
        "instruction": cfg.instruction,
        "subset": cfg.subset,
        "input": job["input"],
        "input_sha256": job["input_sha256"],
        "rows": len(ids),
        "skipped": len(skipped),
        "resumed_rows": reused,
        "dim": int(matrix.shape[1]),
        "seconds": round(elapsed, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    write_atomic(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def _check_job(out: Path, job: dict, resume: bool, rows, shard_size: int) -> tuple[list[int], str | None]:
    """On process 0: 1 per shard the previous run finished, else 0 (or why the run cannot go on);
    records the job."""
    job_file = out / "job.json"
    if job_file.exists():
        if not resume:
            return [], f"{out} already holds an export; pass --resume to continue it or pick a new --output"
        previous = json.loads(job_file.read_text())
        if previous != job:
            changed = sorted(k for k in job if previous.get(k) != job[k])
            return [], f"{out}: cannot resume, the run differs from the interrupted one in: {changed}"
    (out / "shards").mkdir(parents=True, exist_ok=True)
    write_atomic(job_file, json.dumps(job, indent=2, sort_keys=True))
    done = []
    for k, start in enumerate(range(0, len(rows), shard_size)):
        npy, info = out / "shards" / f"{k:05d}.npy", out / "shards" / f"{k:05d}.json"
        lines = [r.line for r in rows[start : start + shard_size]]
        done.append(int(npy.exists() and info.exists() and json.loads(info.read_text())["lines"] == lines))
    return done, None


def _embed_chunk(embedder: Embedder, chunk, role, cfg):
    """(embeddings of the good rows, their ids, bad rows) of a chunk."""
    # Streamed (bounded memory) and, in a multi-process job, shared by every process.
    emb, errors = embedder.encode_rows(
        [r.text for r in chunk], [r.image for r in chunk], role=role, instruction=cfg.instruction,
        subset=cfg.subset, errors="collect", progress=False,
    )  # fmt: skip
    good, ids, bad = [], [], []
    for j, row in enumerate(chunk):
        item = errors.get(j)
        if isinstance(item, InputError):
            bad.append(BadRow(row.line, row.id, item.field, item.reason))
        else:
            good.append(j)
            ids.append(row.id)
    return emb[good], ids, bad


def _check_rows(embedder: Embedder, rows, role, cfg, batch: int = 64) -> list[BadRow]:
    """The bad rows among ``rows`` (host preprocessing only, a few rows at a time so memory stays
    bounded): once a run must fail, it names them all."""
    bad = []
    for start in tqdm(range(0, len(rows), batch), desc="checking the rows", unit="batch", dynamic_ncols=True,
                      disable=not distributed.is_lead()):  # fmt: skip
        part = rows[start : start + batch]
        prepared = embedder.preprocessor.prepare(
            [r.text for r in part], [r.image for r in part], role=role, instruction=cfg.instruction,
            subset=cfg.subset, errors="collect", progress=False,
        )  # fmt: skip
        bad += [BadRow(r.line, r.id, p.field, p.reason) for r, p in zip(part, prepared) if isinstance(p, InputError)]
    return bad
