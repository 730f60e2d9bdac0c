"""``Embedder``: rows of text and/or image in, L2-normalised embeddings out.

Host side, once per row: the user segment is tokenised (cached by its text), the image is resized
and patchified in numpy, over-long content is truncated, and M-RoPE offsets are computed. Device
side, one jitted program per (role, shape bucket): the constant system segment and assistant
header are placed around the user tokens, mask and positions are derived, the backbone runs, and
the last real token (the ``\\n`` after ``assistant``) is pooled and normalised.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from g2e_jax.data.images import ImageConfig, ImageError, num_image_tokens, preprocess
from g2e_jax.models.qwen2_vl import load, rope_index
from g2e_jax.prompts import ASSISTANT_HEADER, IMAGE_PAD, PromptConfig, check_role, get_prompt
from g2e_jax.tokenization import Tokenizer


class InputError(ValueError):
    """A bad input row; ``row`` and ``field`` say where, so callers can name the file line or id."""

    def __init__(self, row: int, field: str, reason: str):
        super().__init__(f"row {row}, field {field!r}: {reason}")
        self.row, self.field, self.reason = row, field, reason


@dataclasses.dataclass
class PreparedRow:
    """One row, ready for batching: everything the jitted encode needs from the host."""

    user_ids: np.ndarray  # [U] int32, image pads expanded
    user_pos: np.ndarray | None  # [3, U] M-RoPE positions relative to the segment start (mrope only)
    next_pos: int  # first position after the user segment, relative to its start
    patches: np.ndarray | None  # [P, C*T*p*p] float32
    grid_thw: np.ndarray | None  # [3]
    truncated_from: int = 0  # original user-segment length when truncated, else 0


def _bucket(n: int, base: int) -> int:
    """Smallest base * 2**k that holds n: rows are sorted by size first, so a batch wastes little,
    and a whole corpus compiles a handful of programs."""
    size = base
    while size < n:
        size *= 2
    return size


class Embedder:
    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        image_config: ImageConfig,
        *,
        prompt: str | PromptConfig = "hierarchical",
        scheme: str | None = None,
        max_len: int = 1024,
        batch_size: int = 8,
        seq_bucket_base: int = 32,
        patch_bucket_base: int = 64,
    ):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.dtype = str(jax.tree.leaves(self.state)[0].dtype)
        self.model_path: Path | None = None  # set by from_pretrained; keys on-disk caches
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.prompt = get_prompt(prompt, **({"scheme": scheme} if scheme else {}))
        self.max_len, self.batch_size = max_len, batch_size
        self.seq_bucket_base, self.patch_bucket_base = seq_bucket_base, patch_bucket_base
        self.image_pad_id = tokenizer.token_id(IMAGE_PAD)
        if self.image_pad_id != self.config.image_token_id:
            raise ValueError(
                f"{tokenizer.path}: <|image_pad|> is id {self.image_pad_id}, but config.json says "
                f"image_token_id {self.config.image_token_id}"
            )
        self.pad_id = tokenizer.token_id("<|endoftext|>")
        self.header_ids = tokenizer.encode(ASSISTANT_HEADER)
        self._user_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._user_cache_size = 200_000
        self.traces: list[tuple] = []  # one entry per compiled program (appended while tracing)
        self._encode = jax.jit(
            functools.partial(_encode_batch, self.graphdef, self.traces),
            static_argnames=("scheme", "pad_id", "max_patches_per_image"),
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        prompt: str | PromptConfig = "hierarchical",
        scheme: str = "gen2embed",
        max_len: int = 1024,
        image_resolution: str | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> "Embedder":
        path = Path(path)
        model = load(path, dtype=dtype, progress=progress)
        image_config = dataclasses.replace(
            ImageConfig.from_preprocessor_config(path), resolution=image_resolution
        )
        embedder = cls(
            model,
            Tokenizer(path),
            image_config,
            prompt=prompt,
            scheme=scheme,
            max_len=max_len,
            batch_size=batch_size,
        )
        embedder.model_path = path
        return embedder

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
        )  # fmt: skip

    def with_prompt(self, prompt: str | PromptConfig | None = None, **changes) -> "Embedder":
        """The same weights and tokenisation cache under another prompt (no copy, no re-load)."""
        other = object.__new__(Embedder)
        other.__dict__.update(self.__dict__)
        other.prompt = get_prompt(prompt if prompt is not None else self.prompt, **changes)
        return other

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
        rows = self.prepare(
            texts, images, role=role, instruction=instruction, subset=subset, progress=progress
        )
        return self.encode_prepared(rows, role=self.prompt.template_role(role, subset), progress=progress)

    def prepare(
        self,
        texts,
        images=None,
        *,
        role: str = "query",
        instruction=None,
        subset: str | None = None,
        errors: str = "raise",
        progress: bool | None = None,
    ) -> list[PreparedRow | InputError]:
        """Host preprocessing of every row. ``errors="collect"`` returns an InputError in place of
        each bad row instead of raising, so a caller can skip it and keep ids aligned."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(images)} images")
        if instruction is None or isinstance(instruction, str):
            instructions = [instruction] * len(texts)
        else:
            instructions = list(instruction)
            if len(instructions) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(instructions)} instructions")
        role = self.prompt.template_role(role, subset)
        system_len = len(self._system_ids(role))
        rows: list[PreparedRow | InputError] = []
        truncated = []
        bar = tqdm(
            total=len(texts),
            desc=f"preparing {role}s",
            unit="row",
            disable=not self._progress(progress, texts),
        )
        for i, (text, image, inst) in enumerate(zip(texts, images, instructions)):
            try:
                row = self._prepare_row(i, text, image, role, inst, system_len)
            except InputError as e:
                if errors == "raise":
                    raise
                row = e
            if isinstance(row, PreparedRow) and row.truncated_from:
                truncated.append(row.truncated_from)
            rows.append(row)
            bar.update()
        bar.close()
        if truncated:
            warnings.warn(
                f"{len(truncated)} of {len(texts)} {role} rows exceeded max_len={self.max_len} and were truncated "
                f"inside their content (longest user segment: {max(truncated)} tokens)",
                stacklevel=2,
            )
        return rows

    def encode_prepared(
        self, rows: Sequence[PreparedRow], *, role: str, progress: bool | None = None
    ) -> np.ndarray:
        check_role(role)
        out = np.zeros((len(rows), self.dim), np.float32)
        if not rows:
            return out
        sys_ids = jnp.asarray(self._system_ids(role))
        header_ids = jnp.asarray(self.header_ids)
        max_user = self.max_len - len(sys_ids) - len(header_ids)
        # Similar shapes together: text-only rows first, then by image size, then by length.
        order = sorted(
            range(len(rows)),
            key=lambda i: (0 if rows[i].patches is None else len(rows[i].patches), len(rows[i].user_ids)),
        )
        bar = tqdm(
            total=len(rows), desc=f"encoding {role}s", unit="row", disable=not self._progress(progress, rows)
        )
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = self._collate([rows[i] for i in index], max_user)
            emb = self._encode(
                self.state, sys_ids, header_ids, **batch["arrays"], scheme=self.prompt.scheme, pad_id=self.pad_id,
                max_patches_per_image=batch["max_patches_per_image"],
            )  # fmt: skip
            out[index] = np.asarray(emb)[: len(index)]
            bar.update(len(index))
        bar.close()
        return out

    # --- host preprocessing ------------------------------------------------------------------------

    def _progress(self, progress, items) -> bool:
        return len(items) > self.batch_size if progress is None else progress

    def _system_ids(self, role: str) -> np.ndarray:
        return self._tokenize(self.prompt.system_segment(role))

    def _tokenize(self, text: str) -> np.ndarray:
        ids = self._user_cache.get(text)
        if ids is None:
            ids = self.tokenizer.encode(text)
            self._user_cache[text] = ids
            if len(self._user_cache) > self._user_cache_size:
                self._user_cache.popitem(last=False)
        else:
            self._user_cache.move_to_end(text)
        return ids

    def _prepare_row(self, i, text, image, role, instruction, system_len) -> PreparedRow:
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InputError(i, "text", f"expected a string, got {type(text).__name__}")
        if instruction is not None and not isinstance(instruction, str):
            raise InputError(i, "instruction", f"expected a string, got {type(instruction).__name__}")
        patches = grid = None
        if image is not None:
            try:
                patches, grid = preprocess(image, self.image_config, source="image")
            except ImageError as e:
                raise InputError(i, "image", str(e)) from None
        elif not text.strip():
            raise InputError(i, "text", "empty text and no image: nothing to embed")
        n_image = 0 if grid is None else num_image_tokens(grid, self.image_config.merge_size)
        budget = self.max_len - system_len - len(self.header_ids)

        def user_ids_for(content: str) -> np.ndarray:
            try:
                user = self.prompt.user_text(
                    role, content, has_image=grid is not None, instruction=instruction
                )
            except ValueError as e:
                raise InputError(i, "text", str(e)) from None
            ids = self._tokenize("\n" + user)
            if n_image:
                (at,) = np.flatnonzero(ids == self.image_pad_id)
                ids = np.concatenate([ids[:at], np.full(n_image, self.image_pad_id, np.int32), ids[at + 1 :]])
            return ids

        ids = user_ids_for(text)
        truncated_from = 0
        if len(ids) > budget:
            truncated_from = len(ids)
            ids = self._truncate(i, text, user_ids_for, budget, n_image)
        user_pos, next_pos = None, len(ids)
        if self.prompt.scheme == "mrope":
            user_pos = rope_index(
                ids[None], None, None if grid is None else grid[None], self.config, "mrope"
            )[:, 0]
            next_pos = int(user_pos.max()) + 1 if len(ids) else 0
        return PreparedRow(ids, user_pos, next_pos, patches, grid, truncated_from)

    def _truncate(self, i, text, user_ids_for, budget, n_image) -> np.ndarray:
        """Longest cut of the content's text (the image marker is kept) whose segment fits."""
        marker = "<|image_1|>"
        head, sep, tail = text.partition(marker) if marker in text else (text, "", "")
        pieces = len(head) + len(tail)

        def cut(keep: int) -> str:  # keep the first `keep` characters of head + tail
            return (
                head[:keep] + sep + tail[: max(0, keep - len(head))]
                if keep < len(head)
                else (head + sep + tail[: keep - len(head)])
            )

        if len(user_ids_for(cut(0))) > budget:
            raise InputError(
                i, "image" if n_image else "text",
                f"does not fit in max_len={self.max_len} even with its content removed "
                f"({n_image} image tokens); lower the image resolution (max_pixels) or raise max_len",
            )  # fmt: skip
        lo, hi = 0, pieces  # invariant: cut(lo) fits, cut(hi + 1..) may not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(user_ids_for(cut(mid))) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return user_ids_for(cut(lo))

    def _collate(self, rows: Sequence[PreparedRow], max_user: int) -> dict:
        b = self.batch_size
        users = _bucket(max(len(r.user_ids) for r in rows), self.seq_bucket_base)
        users = min(users, max(max_user, max(len(r.user_ids) for r in rows)))
        user_ids = np.full((b, users), self.pad_id, np.int32)
        user_len = np.zeros((b,), np.int32)
        user_pos = np.zeros((3, b, users), np.int32)
        next_pos = np.zeros((b,), np.int32)
        for j, r in enumerate(rows):
            user_ids[j, : len(r.user_ids)] = r.user_ids
            user_len[j] = len(r.user_ids)
            next_pos[j] = r.next_pos
            if r.user_pos is not None:
                user_pos[:, j, : len(r.user_ids)] = r.user_pos
        arrays = dict(user_ids=user_ids, user_len=user_len, user_pos=user_pos, next_pos=next_pos)
        with_image = [r for r in rows if r.patches is not None]
        max_per_image = None
        if with_image:
            sizes = [len(r.patches) for r in with_image]
            max_per_image = _bucket(max(sizes), self.patch_bucket_base)
            total = _bucket(sum(sizes), self.patch_bucket_base)
            pixels = np.zeros((total, with_image[0].patches.shape[1]), np.float32)
            grid = np.zeros((b, 3), np.int32)
            offset = 0
            for k, r in enumerate(with_image):
                pixels[offset : offset + len(r.patches)] = r.patches
                grid[k] = r.grid_thw
                offset += len(r.patches)
            arrays.update(pixel_values=pixels, image_grid_thw=grid)
        else:
            arrays.update(pixel_values=None, image_grid_thw=None)
        return {"arrays": arrays, "max_patches_per_image": max_per_image}


def _encode_batch(
    graphdef, traces, state, sys_ids, header_ids, user_ids, user_len, user_pos, next_pos, pixel_values,
    image_grid_thw, *, scheme, pad_id, max_patches_per_image,
):  # fmt: skip
    """Template placement, mask, positions, backbone, last-token pooling and normalisation."""
    traces.append((sys_ids.shape, user_ids.shape, None if pixel_values is None else pixel_values.shape))
    model = nnx.merge(graphdef, state)
    batch, users = user_ids.shape
    n_sys, n_head = sys_ids.shape[0], header_ids.shape[0]
    i = jnp.arange(n_sys + users + n_head)[None, :]
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
        ids, mask.astype(jnp.int32), pixel_values, image_grid_thw, positions,
        max_patches_per_image=max_patches_per_image,
    )  # fmt: skip
    last = n_sys + user_len + n_head - 1
    pooled = hidden[jnp.arange(batch), last].astype(jnp.float32)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
