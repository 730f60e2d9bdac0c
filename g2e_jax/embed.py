"""``Embedder``: rows of text and/or image in, L2-normalised embeddings out.

Host side (``g2e_jax.preprocess``), once per row: tokenised user segment, patchified image, M-RoPE
offsets. Device side, one jitted program per (role, shape bucket): the constant system segment and
assistant header are placed around the user tokens, mask and positions are derived, the backbone
runs, and the last real token (the ``\\n`` after ``assistant``) is pooled and normalised.

Prefix cache: the system segment is the same for every row of a role and, under causal attention,
sees nothing after it, so its keys and values are computed once per (weights, prompt, role) and each
batch runs only the user segment and the header against them: the same embeddings for a fraction of
the work when documents are short.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from g2e_jax.adapters.lora import merge_adapters
from g2e_jax.adapters.peft import WEIGHTS_FILE, load_peft_adapter
from g2e_jax.adapters.trained import is_run_dir, load_trained
from g2e_jax.data.images import ImageConfig
from g2e_jax.io import save_npy_atomic, sha256_file, weights_fingerprint
from g2e_jax.models import load
from g2e_jax.preprocess import InputError, PreparedRow, Preprocessor, bucket, collate
from g2e_jax.prompts import PromptConfig, check_role, plural
from g2e_jax.mesh import constrain

__all__ = ["Embedder", "InputError", "PreparedRow", "embed_batch"]


class Embedder:
    """A backbone and its Preprocessor; ``encode`` runs one jitted program per (role, shape bucket)."""

    def __init__(
        self,
        model,
        preprocessor: Preprocessor,
        *,
        batch_size: int = 8,
        seq_bucket_base: int = 8,
        patch_bucket_base: int = 64,
        model_path: str | Path | None = None,
        weights_id: str | None = None,
        prefix_cache: bool = True,
    ):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.dtype = str(jax.tree.leaves(self.state)[0].dtype)
        self.model_path = None if model_path is None else Path(model_path)
        # Identifies the weights in on-disk caches and export metadata (None: no caching).
        self.weights_id = weights_id
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.seq_bucket_base, self.patch_bucket_base = seq_bucket_base, patch_bucket_base
        self.traces: list[tuple] = []  # one entry per compiled program (appended while tracing)
        self.prefix_cache = prefix_cache
        self._prefixes: dict[tuple, Any] = {}  # system segment ids -> per-layer (k, v); weights are fixed
        self._prefix_kv = jax.jit(lambda state, ids: nnx.merge(self.graphdef, state).prefix_kv(ids))
        self._encode = jax.jit(
            functools.partial(_encode_batch, self.graphdef, self.traces),
            static_argnames=("scheme", "pad_id", "max_patches_per_image"),
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "auto",
        prompt: str | PromptConfig = "hierarchical",
        scheme: str = "gen2embed",
        max_len: int = 1024,
        image_resolution: str | None = None,
        batch_size: int = 8,
        progress: bool = True,
        prefix_cache: bool = True,
        adapter: str | Path | None = None,
    ) -> "Embedder":
        """``path``: a Hugging Face model directory or a ``g2e-jax train`` workdir; ``adapter``: a PEFT
        LoRA/DoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) merged onto ``path``."""
        if is_run_dir(path):  # a `g2e-jax train` workdir: base model + trained parameters, merged
            if adapter is not None:
                raise ValueError(f"{path} is a training workdir; adapter= applies to a base model directory")
            model, base, weights_id = load_trained(path, dtype=dtype)
        elif adapter is not None:
            model, base = load(path, dtype=dtype, progress=progress), Path(path)
            load_peft_adapter(model, adapter)
            merge_adapters(model)
            weights_id = hashlib.sha256(
                f"{weights_fingerprint(path)}:peft:{sha256_file(Path(adapter) / WEIGHTS_FILE)}".encode()
            ).hexdigest()
        else:
            model, base, weights_id = (
                load(path, dtype=dtype, progress=progress),
                Path(path),
                weights_fingerprint(path),
            )
        preprocessor = Preprocessor.from_pretrained(
            base, prompt=prompt, scheme=scheme, max_len=max_len, image_resolution=image_resolution
        )
        return cls(model, preprocessor, batch_size=batch_size, model_path=path, weights_id=weights_id,
                   prefix_cache=prefix_cache)  # fmt: skip

    @classmethod
    def from_config(cls, cfg) -> "Embedder":
        """From the ``model`` / ``prompt`` / ``max_len`` / ``image_resolution`` / ``batch_size`` fields
        that every config of an embedding job shares (see configs/embed.py)."""
        if cfg.model.path is None:
            raise ValueError("no model: set --config.model.path=/path/to/hf_model_dir")
        prompt = {"preset": cfg.prompt.preset, "scheme": cfg.prompt.scheme}
        prompt.update(
            {k: cfg.prompt[k] for k in ("query_system", "document_system") if cfg.prompt[k] is not None}
        )
        return cls.from_pretrained(
            cfg.model.path, dtype=cfg.model.dtype, prompt=prompt, scheme=cfg.prompt.scheme, max_len=cfg.max_len,
            image_resolution=cfg.image_resolution, batch_size=cfg.batch_size, progress=False,
            adapter=cfg.model.get("adapter"),
        )  # fmt: skip

    def with_prompt(self, prompt: str | PromptConfig | None = None, **changes) -> "Embedder":
        """The same weights and tokenisation cache under another prompt (no copy, no re-load)."""
        other = object.__new__(Embedder)
        other.__dict__.update(self.__dict__)
        other.preprocessor = self.preprocessor.with_prompt(prompt, **changes)
        return other

    @property
    def prompt(self) -> PromptConfig:
        return self.preprocessor.prompt

    @property
    def max_len(self) -> int:
        return self.preprocessor.max_len

    @property
    def image_config(self) -> ImageConfig:
        return self.preprocessor.image_config

    @property
    def dim(self) -> int:
        return self.config.text.hidden_size

    # --- public API ------------------------------------------------------------------------------

    def encode(
        self,
        texts: str | Sequence[str],
        images: Sequence[Any] | None = None,
        *,
        role: str = "query",
        instruction: str | Sequence[str | None] | None = None,
        subset: str | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """``[N, D]`` float32 L2-normalised embeddings, in input order.

        ``images[i]`` is a PIL image, a path or None; an MMEB ``<|image_1|>`` marker in a text says
        where its image goes (otherwise the image goes first). ``subset`` applies the prompt's
        Matching rule (candidates of such subsets use the query template).
        """
        rows = self.preprocessor.prepare(
            texts, images, role=role, instruction=instruction, subset=subset, progress=progress
        )
        return self.encode_prepared(rows, role=self.prompt.template_role(role, subset), progress=progress)

    def encode_cached(
        self,
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
        """``encode`` with an on-disk cache in chunks of ``chunk`` rows: an interrupted run resumes
        at the first missing chunk, and a re-run with the same weights, prompt, settings and rows
        encodes nothing. Returns (embeddings, whether everything came from the cache)."""
        images = [None] * len(texts) if images is None else list(images)
        if cache_dir is None or self.weights_id is None:
            return self.encode(texts, images, role=role, subset=subset, progress=progress), False
        key = self._cache_key(texts, images, role, subset)
        folder = Path(cache_dir) / f"{name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        parts, all_cached = [], True
        for k, start in enumerate(range(0, len(texts), chunk)):
            file = folder / f"{k:05d}.npy"
            if file.is_file():
                parts.append(np.load(file))
                continue
            all_cached = False
            emb = self.encode(texts[start : start + chunk], images[start : start + chunk], role=role, subset=subset,
                              progress=progress)  # fmt: skip
            save_npy_atomic(file, emb)
            parts.append(emb)
        out = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        return out, all_cached

    def _cache_key(self, texts, images, role, subset) -> str:
        digest = hashlib.sha256()
        settings = {
            "weights": self.weights_id,
            "prompt": dataclasses.asdict(self.prompt),
            "dtype": self.dtype,
            "max_len": self.max_len,
            "image": dataclasses.asdict(self.image_config),
            "role": self.prompt.template_role(role, subset),
        }
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for text, image in zip(texts, images):
            digest.update(str(text).encode() + b"\0" + str(image or "").encode() + b"\1")
        return digest.hexdigest()[:24]

    def encode_prepared(
        self, rows: Sequence[PreparedRow], *, role: str, progress: bool | None = None
    ) -> np.ndarray:
        check_role(role)
        out = np.zeros((len(rows), self.dim), np.float32)
        if not rows:
            return out
        sys_ids = jnp.asarray(self.preprocessor.system_ids(role))
        header_ids = jnp.asarray(self.preprocessor.header_ids)
        prefix = self.system_prefix(role)
        max_user = self.max_len - len(sys_ids) - len(header_ids)
        # Similar shapes together: text-only rows first, then by image size, then by length.
        order = sorted(
            range(len(rows)),
            key=lambda i: (0 if rows[i].patches is None else len(rows[i].patches), len(rows[i].user_ids)),
        )
        bar = tqdm(
            total=len(rows),
            desc=f"encoding {plural(role)}",
            unit="row",
            disable=not (len(rows) > self.batch_size if progress is None else progress),
        )
        pending = None  # the batch on the device while the host collates the next one
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self._collate([rows[i] for i in index], max_user)
            emb = self._encode(
                self.state, sys_ids, header_ids, prefix, **batch["arrays"], scheme=self.prompt.scheme, pad_id=self.preprocessor.pad_id,
                max_patches_per_image=batch["max_patches_per_image"],
            )  # fmt: skip
            if pending is not None:
                bar.update(_fetch(out, *pending))
            pending = (index, emb)
        if pending is not None:
            bar.update(_fetch(out, *pending))
        bar.close()
        return out

    def system_prefix(self, role: str):
        """The role's system-segment keys and values, computed on first use (None: cache off)."""
        ids = tuple(int(i) for i in self.preprocessor.system_ids(role))
        if not self.prefix_cache or not ids:
            return None
        if ids not in self._prefixes:
            self._prefixes[ids] = self._prefix_kv(self.state, jnp.asarray(ids, jnp.int32))
        return self._prefixes[ids]

    def _collate(self, rows: Sequence[PreparedRow], max_user: int) -> dict:
        """Buckets for this batch's shapes, then the fixed-shape arrays."""
        longest = max(len(r.user_ids) for r in rows)
        users = min(bucket(longest, self.seq_bucket_base), max(max_user, longest))
        sizes = [len(r.patches) for r in rows if r.patches is not None]
        patches = bucket(sum(sizes), self.patch_bucket_base) if sizes else None
        # Image slots: the batch's images rounded up to a power of two, not one per row (the vision
        # tower's attention runs per slot).
        images = bucket(len(sizes), 1) if sizes else None
        # A short last batch (or a single query) runs at the next power of two rows, not a full one.
        batch = min(self.batch_size, bucket(len(rows), 1))
        # Pixels in the weights' dtype (the patch embedding's first cast): half the transfer in bf16.
        arrays = collate(rows, batch_size=batch, users=users, patches=patches, images=images,
                         pad_id=self.preprocessor.pad_id, patch_dim=self.config.vision.patch_dim,
                         pixel_dtype=self.dtype)  # fmt: skip
        max_per_image = bucket(max(sizes), self.patch_bucket_base) if sizes else None
        return {"arrays": arrays, "max_patches_per_image": max_per_image}


def _fetch(out: np.ndarray, index: list[int], emb) -> int:
    """Writes a finished batch's rows into ``out`` (blocks until the device is done with it)."""
    out[index] = np.asarray(emb)[: len(index)]
    return len(index)


def _encode_batch(graphdef, traces, state, sys_ids, header_ids, prefix, **arrays):
    """The Embedder's jitted program: weights as an argument (not constants), traces counted."""
    pixels = arrays["pixel_values"]
    traces.append((sys_ids.shape, arrays["user_ids"].shape, None if pixels is None else pixels.shape))
    return embed_batch(nnx.merge(graphdef, state), sys_ids, header_ids, **arrays, prefix=prefix)


def embed_batch(
    model, sys_ids, header_ids, user_ids, user_len, user_pos, next_pos, pixel_values, image_grid_thw, *,
    scheme, pad_id, max_patches_per_image, prefix=None, output_attentions=False,
):  # fmt: skip
    """Template placement, mask, positions, backbone, last-token pooling and normalisation.

    Pure and differentiable: the forward of both ``Embedder.encode`` and training. Arrays are those
    of ``g2e_jax.preprocess.collate``; the system segment and header are the role's constants. With
    ``prefix`` (``model.prefix_kv(sys_ids)``) the system segment is not run again: the program starts
    at the user segment, at the same positions, and gives the same embeddings. ``output_attentions``
    (static, for analysis) also returns each layer's attention probabilities ``[B, H, L, L]`` over
    the tokens the program runs (system segment, user segment, header, then padding).
    """
    batch, users = user_ids.shape
    n_sys, n_head = sys_ids.shape[0], header_ids.shape[0]
    start = 0 if prefix is None else n_sys  # the first token this program runs
    i = jnp.arange(start, n_sys + users + n_head)[None, :]  # positions in the whole template
    rel = i - n_sys  # index into the user segment
    head = rel - user_len[:, None]  # index into the assistant header
    in_sys, in_user = i < n_sys, (rel >= 0) & (head < 0)
    in_head = (head >= 0) & (head < n_head)
    ids = jnp.where(
        in_sys,
        sys_ids[jnp.clip(i, 0, n_sys - 1)],
        jnp.where(
            in_user,
            jnp.take_along_axis(user_ids, jnp.clip(rel, 0, users - 1), axis=1),
            jnp.where(in_head, header_ids[jnp.clip(head, 0, n_head - 1)], pad_id),
        ),
    )
    mask = in_sys | in_user | in_head
    if scheme == "gen2embed":
        positions = jnp.broadcast_to(jnp.where(mask, i, 1)[None], (3, batch, i.shape[1]))
    else:
        user = n_sys + jnp.take_along_axis(
            user_pos, jnp.broadcast_to(jnp.clip(rel, 0, users - 1), (3, batch, i.shape[1])), axis=2
        )
        header = n_sys + next_pos[:, None] + head
        positions = jnp.where(in_user[None], user, jnp.where(in_head, header, jnp.where(in_sys, i, 1))[None])
    hidden = model(
        ids, mask.astype(jnp.int32), pixel_values, image_grid_thw, positions, prefix=prefix,
        max_patches_per_image=max_patches_per_image, output_attentions=output_attentions,
    )  # fmt: skip
    hidden, attentions = hidden if output_attentions else (hidden, None)
    last = n_sys + user_len + n_head - 1 - start
    pooled = hidden[jnp.arange(batch), last].astype(jnp.float32)
    emb = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    emb = constrain(emb, ("activation_batch", "activation_embed"))
    return (emb, attentions) if output_attentions else emb
