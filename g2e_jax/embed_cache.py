"""Embeddings kept on disk in chunks, keyed by everything that decides them, so that a re-run encodes
only what it has not encoded before (``encode_cached``, which is also the method ``Embedder.encode_cached``).

A cache folder is ``{name}-{key}``, the key a hash of the weights' id, the prompt, dtype, max_len,
image settings, template role and the rows themselves; each chunk one ``NNNNN.npy`` file, written
atomically, so an interrupted run resumes at the first missing chunk. In a multi-process job
process 0 holds the cache (no shared file system needed) and broadcasts what it read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from g2e_jax import distributed
from g2e_jax.io import save_npy_atomic


def encode_cached(
    embedder,
    texts: Sequence[str],
    images: Sequence[Any] | None,
    *,
    role: str,
    cache_dir: str | Path | None,
    name: str,
    subset: str | None = None,
    chunk: int = 4096,
    progress: bool | None = None,
) -> tuple[np.ndarray, bool]:
    """``embedder.encode`` with an on-disk cache in chunks of ``chunk`` rows (none without a
    ``cache_dir`` or a weights id). Returns (embeddings, whether everything came from the cache)."""
    images = [None] * len(texts) if images is None else list(images)
    if cache_dir is None or embedder.weights_id is None:
        return embedder.encode(texts, images, role=role, subset=subset, progress=progress), False
    key = cache_key(embedder, texts, images, role, subset)
    folder = Path(cache_dir) / f"{name}-{key}"
    lead = distributed.is_lead()
    if lead:
        folder.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(texts), chunk))
    # Process 0 holds the cache (no shared file system needed); the others learn what it holds.
    cached = distributed.broadcast(np.array([lead and (folder / f"{k:05d}.npy").is_file()
                                             for k in range(len(starts))], np.int32))  # fmt: skip
    parts = []
    for k, start in enumerate(starts):
        file = folder / f"{k:05d}.npy"
        if cached[k]:
            emb = (
                np.load(file)
                if lead
                else np.zeros((min(chunk, len(texts) - start), embedder.dim), np.float32)
            )
            parts.append(distributed.broadcast(emb))
            continue
        emb = embedder.encode(texts[start : start + chunk], images[start : start + chunk], role=role,
                              subset=subset, progress=progress)  # fmt: skip
        if lead:
            save_npy_atomic(file, emb)
        parts.append(emb)
    out = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), np.float32)
    return out, bool(cached.all())


def cache_key(embedder, texts, images, role, subset) -> str:
    """The hash naming a cache folder: the settings that decide the embeddings, then every row."""
    digest = hashlib.sha256()
    settings = {
        "weights": embedder.weights_id,
        "prompt": dataclasses.asdict(embedder.prompt),
        "dtype": embedder.dtype,
        "max_len": embedder.max_len,
        "image": dataclasses.asdict(embedder.image_config),
        "role": embedder.prompt.template_role(role, subset),
        **({"dim": embedder.dim} if embedder.dim != embedder.config.text.hidden_size else {}),
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for text, image in zip(texts, images):
        digest.update(str(text).encode() + b"\0" + str(image or "").encode() + b"\1")
    return digest.hexdigest()[:24]
