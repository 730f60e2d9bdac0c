"""``Embedder``: rows of text and/or image in, L2-normalised embeddings out.

Host side (``g2e_jax.preprocess``), once per row: tokenised user segment, patchified image, M-RoPE
offsets. Device side (``g2e_jax.programs.encode``), one jitted program per (role, shape bucket): the
constant system segment and assistant header are placed around the user tokens, mask and positions
are derived, the backbone runs, and the last real token (the ``\\n`` after ``assistant``) is pooled
and normalised. ``g2e_jax.encode_loop`` runs the batches on the mesh (prefix cache, cells, several
processes), ``g2e_jax.weights`` finds the weights a path names and ``g2e_jax.embed_cache`` keeps
embeddings on disk.

Scale: rows stream from a worker pool through a bounded queue (``g2e_jax.pipeline``), so host
memory does not grow with the number of rows. In a multi-process job ``encode`` is collective:
every process passes the same rows, prepares only its share and receives all the embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from g2e_jax import distributed
from g2e_jax.config_sections import prompt_fields
from g2e_jax.data.rows import PreparedRow
from g2e_jax.embed_cache import encode_cached
from g2e_jax.encode_loop import EncodeLoop
from g2e_jax.mesh import make_mesh
from g2e_jax.pipeline import RowStream, shape_key
from g2e_jax.preprocess import InputError, Preprocessor
from g2e_jax.prompts import PromptConfig, check_role
from g2e_jax.weights import load_weights

__all__ = ["Embedder", "InputError", "PreparedRow"]

# The row columns every encode takes (see ``Preprocessor.columns``).
Texts = str | Sequence[str]
Images = Sequence[Any] | None
Instructions = str | Sequence[str | None] | None


class Embedder(EncodeLoop):
    """A backbone and its Preprocessor; ``encode`` runs one jitted program per (role, shape bucket)."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "auto",
        prompt: str | PromptConfig = "hierarchical",
        scheme: str | None = None,
        max_len: int = 1024,
        image_resolution: str | None = None,
        batch_size: int = 8,
        progress: bool = True,
        prefix_cache: bool = True,
        adapter: str | Path | None = None,
        mesh: Mesh | None = None,
        shard_weights: bool = False,
        workers: int | None = None,
        device_memory_gb: float | None = None,
        dim: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> Embedder:
        """``path``: a Hugging Face model directory or a ``g2e-jax train`` workdir; ``adapter``: a PEFT
        LoRA/DoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) merged onto ``path``.
        ``mesh=None``: every device JAX sees, on the data axis, or with ``shard_weights`` on the fsdp
        axis (weights sharded by the training table: a model too big for one device).
        ``device_memory_gb``: see ``Embedder``. ``scheme``: None keeps the prompt's own.
        ``dim``: Matryoshka dimensions, each embedding truncated to its first ``dim`` coordinates and
        normalised again (1 to the hidden size; None: the whole hidden state). ``min_pixels`` /
        ``max_pixels``: the image processor's pixel bounds in place of the checkpoint's
        preprocessor_config.json (Qwen-family backbones).

        Qwen3-VL-Embedding (2B, 8B) checkpoints are plain ``Qwen3VLForConditionalGeneration``
        directories (``model.language_model.*``, ``model.visual.*``): they load as any ``qwen3_vl``
        model, and nothing in them tells them from Qwen3-VL-Instruct, so the format is chosen, not
        detected: ``prompt="qwen3_vl_embedding"`` embeds as their reference code does (its
        instruction per row with ``instruction=``; see ``g2e_jax.prompts``), and the hierarchical
        prompt stays available on the same weights (``with_prompt``). E.g.
        ``Embedder.from_pretrained("Qwen3-VL-Embedding-2B", prompt="qwen3_vl_embedding", dim=1024,
        min_pixels=4096, max_pixels=1843200)`` (the reference's image bounds, not the checkpoint's)."""
        model, base, weights_id = load_weights(path, dtype=dtype, progress=progress, adapter=adapter)
        preprocessor = Preprocessor.from_pretrained(
            base, prompt=prompt, scheme=scheme, max_len=max_len, image_resolution=image_resolution,
            min_pixels=min_pixels, max_pixels=max_pixels,
        )  # fmt: skip
        if mesh is None and shard_weights:
            mesh = make_mesh(data=1, fsdp=jax.device_count())
        return cls(model, preprocessor, batch_size=batch_size, model_path=path, weights_id=weights_id,
                   prefix_cache=prefix_cache, mesh=mesh, workers=workers,
                   device_memory_gb=device_memory_gb, dim=dim)  # fmt: skip

    @classmethod
    def from_config(cls, cfg) -> Embedder:
        """From the ``model`` / ``prompt`` / ``max_len`` / ``image_resolution`` / ``batch_size`` fields
        that every config of an embedding job shares (see configs/embed.py), and ``dim`` /
        ``min_pixels`` / ``max_pixels`` where the job has them (embed, eval)."""
        if cfg.model.path is None:
            raise ValueError("no model: set --config.model.path=/path/to/hf_model_dir")
        return cls.from_pretrained(
            cfg.model.path, dtype=cfg.model.dtype, prompt=prompt_fields(cfg.prompt), scheme=cfg.prompt.scheme,
            max_len=cfg.max_len, image_resolution=cfg.image_resolution, batch_size=cfg.batch_size, progress=False,
            adapter=cfg.model.get("adapter"), shard_weights=bool(cfg.model.get("shard_weights", False)),
            dim=cfg.get("dim"), min_pixels=cfg.get("min_pixels"), max_pixels=cfg.get("max_pixels"),
        )  # fmt: skip

    def with_prompt(self, prompt: str | PromptConfig | None = None, **changes) -> Embedder:
        """The same weights and tokenisation cache under another prompt (no copy, no re-load)."""
        other = object.__new__(Embedder)
        other.__dict__.update(self.__dict__)
        other.preprocessor = self.preprocessor.with_prompt(prompt, **changes)
        return other

    # --- public API ------------------------------------------------------------------------------

    def encode(self, texts: Texts, images: Images = None, *, role: str = "query",
               instruction: Instructions = None, subset: str | None = None,
               progress: bool | None = None) -> np.ndarray:  # fmt: skip
        """``[N, D]`` float32 L2-normalised embeddings, in input order.

        ``images[i]`` is a PIL image, a path or None; an MMEB ``<|image_1|>`` marker in a text says
        where its image goes (otherwise the image goes first). ``subset`` applies the prompt's
        Matching rule (candidates of such subsets use the query template). Collective in a
        multi-process job (see the module docstring).
        """
        emb, _ = self.encode_rows(texts, images, role=role, instruction=instruction, subset=subset,
                                  errors="raise", progress=progress)  # fmt: skip
        return emb

    def encode_rows(self, texts: Texts, images: Images = None, *, role: str = "query",
                    instruction: Instructions = None, subset: str | None = None, errors: str = "collect",
                    progress: bool | None = None) -> tuple[np.ndarray, dict[int, InputError]]:  # fmt: skip
        """``encode`` through the streaming pipeline, also returning the bad rows ({row: error}; with
        ``errors="collect"`` their embeddings are zeros, with ``"raise"`` the first one raises)."""
        texts, images, instructions = self.preprocessor.columns(texts, images, instruction)
        role = self.prompt.template_role(role, subset)
        check_role(role)
        n, mine = len(texts), distributed.share(len(texts))
        stream = RowStream(self.preprocessor, texts, images, instructions, mine, role=role, errors=errors,
                           batch_size=self.local_cells * self.rows_per_cell, window=self.window,
                           workers=self.workers)  # fmt: skip
        show = (n > self.batch_size if progress is None else progress) and distributed.is_lead()
        local = self._run(stream, len(mine), mine.start, role, show)
        bad = {}
        for part in distributed.allgather_json([[i, e.field, e.reason] for i, e in stream.bad.items()]):
            bad.update({int(i): InputError(int(i), field, reason) for i, field, reason in part})
        truncated = distributed.allgather_json(stream.truncated)
        if any(truncated) and distributed.is_lead():
            longest = max(max(t) for t in truncated if t)
            warnings.warn(f"{sum(map(len, truncated))} of {n} {role} rows exceeded max_len={self.max_len} and were "
                          f"truncated inside their content (longest user segment: {longest} tokens)", stacklevel=2)  # fmt: skip
        return distributed.gather_shares(local, n), dict(sorted(bad.items()))

    # ``encode`` with an on-disk cache, defined with the cache (``g2e_jax.embed_cache``); returns
    # (embeddings, whether everything came from the cache).
    encode_cached = encode_cached

    def encode_prepared(
        self, rows: Sequence[PreparedRow], *, role: str, progress: bool | None = None
    ) -> np.ndarray:
        """Rows this process already prepared, sorted by shape and encoded (collective: in a
        multi-process job each process passes its own rows and gets their embeddings)."""
        check_role(role)
        size = self.local_cells * self.rows_per_cell
        order = sorted(range(len(rows)), key=lambda i: shape_key(rows[i]))
        batches = (
            (order[s : s + size], [rows[i] for i in order[s : s + size]]) for s in range(0, len(order), size)
        )
        show = len(rows) > self.batch_size if progress is None else progress
        return self._run(batches, len(rows), 0, role, show and distributed.is_lead())
