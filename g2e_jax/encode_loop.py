"""The device half of ``Embedder``: the weights on the mesh, the jitted encode program and the loop
that runs batches of prepared rows through it, one cell per device of the mesh's data axes.

Prefix cache: the system segment is the same for every row of a role and, under causal attention,
sees nothing after it, so its keys and values are computed once per (weights, prompt, role) and each
batch runs only the user segment and the header against them: the same embeddings for a fraction of
the work when documents are short.

Scale: each batch is cut into one cell per device of the mesh's data axes (``[cells, rows_per_cell,
...]``, each cell with its own packed images) and the cells run data-parallel, weights replicated or
sharded by the training table (``mesh.py``). In a multi-process job every step is collective: the
processes agree on the batch's shapes first, so all run the same program.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from g2e_jax import distributed
from g2e_jax.aot import AheadOfTime, ProgramTooLarge, device_memory_limit, fmt_bytes
from g2e_jax.data.rows import PreparedRow
from g2e_jax.mesh import BATCH_AXES, make_mesh, state_shardings
from g2e_jax.models.qwen2_vl.images import ImageConfig
from g2e_jax.preprocess import InputError, Preprocessor, bucket, collate
from g2e_jax.programs.encode import encode_cells
from g2e_jax.prompts import PromptConfig, plural

PATCH_STEPS = 4  # patch buckets per doubling (``bucket(per_octave=...)``): padding under a quarter


class EncodeLoop:
    """A backbone on a mesh and its Preprocessor; ``_run`` encodes batches of prepared rows with one
    jitted program per (role, shape bucket)."""

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
        mesh: Mesh | None = None,
        workers: int | None = None,
        window: int | None = None,
        device_memory_gb: float | None = None,
        dim: int | None = None,
    ):
        """``mesh``: default, every device on the data axis (weights replicated); a mesh with an
        ``fsdp``/``tensor`` axis shards the weights by the training table. ``batch_size`` rows per
        batch in all, rounded up to a multiple of the data-axis size. ``workers`` image threads
        (default: one per core) and a sort window of ``window`` rows (default 8 batches).
        ``device_memory_gb``: what one device holds, where the backend does not say (CPU); with a
        limit known, the largest text program is compiled and checked before the first batch.
        ``dim``: Matryoshka dimensions, the embeddings truncated to their first ``dim`` coordinates
        and normalised again, on the device (None: the hidden size, untruncated)."""
        self.config = model.config
        self.embed_dim = check_dim(dim, model.config.text.hidden_size)
        self.mesh = make_mesh() if mesh is None else mesh
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, state_shardings(state, self.mesh))
        self.batch_axes = tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)
        self.cells = int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))
        self.rows_per_cell = max(1, -(-batch_size // self.cells))
        self._cell_sharding = NamedSharding(self.mesh, P(self.batch_axes))
        self.workers, self.window = workers, window
        self.dtype = str(jax.tree.leaves(self.state)[0].dtype)
        self.model_path = None if model_path is None else Path(model_path)
        # Identifies the weights in on-disk caches and export metadata (None: no caching).
        self.weights_id = weights_id
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.seq_bucket_base, self.patch_bucket_base = seq_bucket_base, patch_bucket_base
        self.traces: list[tuple] = []  # one entry per compiled program (appended while tracing)
        # Patches of this process's batches: real, stream slots (cells x the bucket) and key slots
        # (images x the largest image's bucket: the keys each image's queries meet); for benchmarks.
        self.patch_stats = {"real": 0, "stream": 0, "keys": 0}
        self.prefix_cache = prefix_cache
        self._prefixes: dict[tuple, Any] = {}  # system segment ids -> (k, v) [layers, P, Hk, D]; weights are fixed
        self._prefix_kv = jax.jit(lambda state, ids: nnx.merge(self.graphdef, state).prefix_kv(ids))
        static = ("scheme", "pad_id", "max_patches_per_image", "dim")
        jitted = jax.jit(
            functools.partial(encode_cells, self.graphdef, self.traces),
            static_argnames=static,
            out_shardings=self._cell_sharding,
        )
        # Every program (one per role and shape bucket) is compiled and its memory checked before it
        # runs; traced without the mesh context, as before (no activation constraints here yet).
        limit, source = device_memory_limit(device_memory_gb, key="device_memory_gb")
        # The largest text program is compiled up front only against a device's or a configured
        # limit; against the host's memory (CPU) each program is checked when its shapes first come.
        self._check_text_first = limit is not None
        if limit is None:
            limit, source = device_memory_limit(None, key="device_memory_gb", host_default=True)
        advice = _encode_advice(self.mesh)
        self._encode = AheadOfTime(
            jitted, "encode program", limit=limit, limit_source=source, advice=advice, static=static
        )

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
        """The embeddings' width: ``dim`` if truncated, else the hidden size."""
        return self.embed_dim

    @property
    def _dim_static(self) -> int | None:
        return None if self.embed_dim == self.config.text.hidden_size else self.embed_dim

    @functools.cached_property
    def _local_cell_range(self) -> tuple[int, int]:
        """This process's cells: a contiguous range of the data axes (the process-local batch)."""
        index = self._cell_sharding.addressable_devices_indices_map((self.cells,))
        spans = {sl[0].indices(self.cells)[:2] for sl in index.values()}
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        if sum(b - a for a, b in spans) != hi - lo:
            raise ValueError(
                f"this process's devices do not hold a contiguous part of the mesh's data axes: {spans}"
            )
        return lo, hi

    @property
    def local_cells(self) -> int:
        lo, hi = self._local_cell_range
        return hi - lo

    def _run(self, batches, n: int, offset: int, role: str, progress: bool) -> np.ndarray:
        """Encodes ``(positions, rows)`` batches into an ``[n, D]`` array (row ``positions - offset``).

        With several processes every step first agrees on the shapes (an all-gather of each
        process's needs), so all run the same program, also when one has no rows left or hit a bad
        row (then every process raises the lowest such row's error)."""
        out = np.zeros((n, self.dim), np.float32)
        sys_ids = jnp.asarray(self.preprocessor.system_ids(role))
        header_ids = jnp.asarray(self.preprocessor.header_ids)
        prefix = self.system_prefix(role)
        max_user = self.max_len - len(sys_ids) - len(header_ids)
        if self._check_text_first:
            self._compile_largest_text(sys_ids, header_ids, prefix, max_user)
        bar = tqdm(total=n, desc=f"encoding {plural(role)}", unit="row", disable=not progress)
        many = jax.process_count() > 1
        batches = iter(batches)
        pending = None  # the batch on the device while the host collates the next one
        while True:
            failed = None
            try:
                positions, rows = next(batches, ((), ()))
            except InputError as e:
                if not many:
                    raise
                positions, rows, failed = (), (), e
            need = distributed.allgather_max(self._needs(rows) + [failed is not None])
            if need[-1]:
                reports = distributed.allgather_json(
                    None if failed is None else [failed.row, failed.field, failed.reason]
                )
                raise InputError(*min(r for r in reports if r is not None))
            if not need[0]:
                break
            batch = self._collate_cells(rows, need, max_user)
            try:
                emb = self._encode(
                    self.state, sys_ids, header_ids, prefix, **batch["arrays"], scheme=self.prompt.scheme,
                    pad_id=self.preprocessor.pad_id, max_patches_per_image=batch["max_patches_per_image"],
                    dim=self._dim_static,
                )  # fmt: skip
            except ProgramTooLarge as e:
                # Every process compiled the same program against the same limit: all split alike.
                if need[1] <= 1:
                    raise self._too_large(e, positions, rows) from None
                half = (len(rows) + 1) // 2
                halves = [(positions[:half], rows[:half]), (positions[half:], rows[half:])]
                batches = itertools.chain(halves, batches)
                continue
            if pending is not None:
                bar.update(self._fetch(out, *pending))
            pending = ([p - offset for p in positions], batch["slots"], emb)
        if pending is not None:
            bar.update(self._fetch(out, *pending))
        bar.close()
        return out

    def _too_large(self, e: ProgramTooLarge, positions, rows) -> ValueError:
        """The error for a single row whose program cannot fit: its largest image and what to change."""
        sized = [(len(r.patches), p, r) for p, r in zip(positions, rows) if r.patches is not None]
        if not sized:  # a text row (or another process's row): the check's own message says it all
            return ValueError(str(e))
        patches, position, row = max(sized, key=lambda t: t[0])
        t, h, w = (int(x) for x in row.grid_thw)
        side = self.config.vision.patch_size
        return ValueError(
            f"row {position}: its image ({w * side}x{h * side} pixels after resizing, {patches} patches) "
            f"makes a one-row encode program of {fmt_bytes(e.need['total'])} (temporaries "
            f"{fmt_bytes(e.need['temp'])}), more than the {fmt_bytes(e.limit)} a device holds "
            f"({self._encode.limit_source}): resize the images smaller (image_resolution, or max_pixels in "
            "the model's preprocessor_config.json), or shard the weights over more devices"
        )

    def _compile_largest_text(self, sys_ids, header_ids, prefix, max_user: int) -> None:
        """Before the first batch: the program of a full batch of the longest text rows, compiled
        and checked against the device (an error naming its needs and the mesh change); reported
        once. Image batches' programs get the same check when their shapes first come."""
        batch = self._collate_cells([], [1, self.rows_per_cell, max_user, 0, 0, 0, 0], max_user)
        known = len(self._encode.memory)
        statics = {
            "scheme": self.prompt.scheme,
            "pad_id": self.preprocessor.pad_id,
            "max_patches_per_image": None,
            "dim": self._dim_static,
        }
        self._encode.compile(self.state, sys_ids, header_ids, prefix, **batch["arrays"], **statics)
        if len(self._encode.memory) > known and distributed.is_lead():
            what = self._encode.describe(list(self._encode.memory)[-1])
            print(f"{what} (a full batch of {self.max_len}-token text rows)", file=sys.stderr, flush=True)

    def _needs(self, rows: Sequence[PreparedRow]) -> list[int]:
        """[any rows, rows per cell, longest user segment, most patches / images in a cell, largest
        image]: maxima over processes give every process the same shapes."""
        if not rows:
            return [0] * 6
        per_cell = min(self.rows_per_cell, bucket(-(-len(rows) // self.local_cells), 1))
        cells = [rows[c : c + per_cell] for c in range(0, len(rows), per_cell)]
        sizes = [[len(r.patches) for r in cell if r.patches is not None] for cell in cells]
        return [1, per_cell, max(len(r.user_ids) for r in rows), max(sum(s) for s in sizes),
                max(len(s) for s in sizes), max((max(s) for s in sizes if s), default=0)]  # fmt: skip

    def _collate(self, rows: Sequence[PreparedRow], max_user: int) -> dict:
        """This process's part of one batch of ``rows`` (see ``_collate_cells``)."""
        return self._collate_cells(rows, self._needs(rows) + [0], max_user)

    def _collate_cells(self, rows: Sequence[PreparedRow], need, max_user: int) -> dict:
        """Buckets for the batch's shapes, then ``[local cells, rows per cell, ...]`` arrays, each cell
        with its own packed images, placed on the mesh."""
        _, per_cell, longest, patches, images, largest, _ = (int(v) for v in need)
        # This process's rows fill its cells as _needs measured them; cells are padded to per_cell.
        mine = self._needs(rows)[1] or 1
        users = min(bucket(longest, self.seq_bucket_base), max(max_user, longest))
        # Image slots: the cell's images rounded up to a power of two, not one per row. Patch counts in
        # steps of a quarter octave: the stream's norms and MLPs pay for every slot, each image's
        # queries for the largest image's keys (issue 28: 1.05 stream slots per real patch on mixed sizes).
        real = sum(len(r.patches) for r in rows if r.patches is not None)
        patches = bucket(patches, self.patch_bucket_base, per_octave=PATCH_STEPS) if patches else None
        images = bucket(images, 1) if images else None
        cells = []
        for c in range(self.local_cells):
            # A short last batch (or a single query) runs at the next power of two rows, not a full one.
            # Pixels in the weights' dtype (the patch embedding's first cast): half the transfer in bf16.
            cells.append(collate(rows[c * mine : (c + 1) * mine], batch_size=per_cell, users=users,
                                 patches=patches, images=images, pad_id=self.preprocessor.pad_id,
                                 patch_dim=self.config.vision.patch_dim, pixel_dtype=self.dtype))  # fmt: skip
        arrays = {k: None if cells[0][k] is None else self._to_mesh(np.stack([c[k] for c in cells]))
                  for k in cells[0]}  # fmt: skip
        max_per_image = bucket(largest, self.patch_bucket_base, per_octave=PATCH_STEPS) if largest else None
        if real:
            self.patch_stats["real"] += real
            self.patch_stats["stream"] += patches * len(cells)
            self.patch_stats["keys"] += max_per_image * sum(r.patches is not None for r in rows)
        slots = [(j // mine) * per_cell + j % mine for j in range(len(rows))]  # rows in the flat output
        return {"arrays": arrays, "max_patches_per_image": max_per_image, "slots": slots}

    def _to_mesh(self, local: np.ndarray):
        return jax.make_array_from_process_local_data(
            self._cell_sharding, local, (self.cells, *local.shape[1:])
        )

    def _fetch(self, out: np.ndarray, index: list[int], slots: list[int], emb) -> int:
        """Writes this process's rows of a finished batch into ``out`` (waits for the device)."""
        lo, hi = self._local_cell_range
        if emb.is_fully_addressable:
            local = np.asarray(emb)[lo:hi]
        else:
            shards = {s.index[0].indices(self.cells)[0]: s.data for s in emb.addressable_shards}
            local = np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
        out[index] = local.reshape(-1, local.shape[-1])[slots]
        return len(index)

    def system_prefix(self, role: str):
        """The role's system-segment keys and values, computed on first use (None: cache off)."""
        ids = tuple(int(i) for i in self.preprocessor.system_ids(role))
        if not self.prefix_cache or not ids:
            return None
        if ids not in self._prefixes:
            self._prefixes[ids] = self._prefix_kv(self.state, jnp.asarray(ids, jnp.int32))
        return self._prefixes[ids]


def check_dim(dim, hidden_size: int) -> int:
    """``dim`` (Matryoshka truncation) as an int within 1..hidden size; None: the hidden size."""
    if dim is None:
        return hidden_size
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= hidden_size:
        raise ValueError(
            f"dim={dim!r}: the embedding dimension must be an integer from 1 to the model's hidden size "
            f"{hidden_size} (None: all {hidden_size})"
        )
    return int(dim)


def _encode_advice(mesh: Mesh) -> str:
    """The change that makes an encode program smaller: shard the weights, then shrink the batch."""
    if mesh.size == 1:
        return (
            "one device holds the whole program: lower batch_size or max_len, or run on more devices "
            "with the weights sharded (model.shard_weights=True)"
        )
    if mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1) < mesh.size:
        return (
            "shard the weights over the devices (model.shard_weights=True; Embedder.from_pretrained("
            "shard_weights=True)), or lower batch_size or max_len"
        )
    return "the weights are already sharded over every device: lower batch_size or max_len, or add devices"
