"""The encode program: rows of token ids and patches in, L2-normalised embeddings out, on device.

``embed_batch`` is the pure, differentiable forward of both ``Embedder.encode`` and training
(template placement, mask, positions, backbone, last-token pooling); ``encode_cells`` is the
Embedder's jitted program around it, one cell per device of the data axes. Host work (batching,
buckets, the prefix cache's bookkeeping) stays in ``g2e_jax.encode_loop``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from g2e_jax.mesh import constrain


def encode_cells(graphdef, traces, state, sys_ids, header_ids, prefix, **arrays):
    """The Embedder's jitted program over ``[cells, rows, ...]`` arrays: the cells vmapped (sharded
    over the data axes); weights as an argument (not constants), traces counted per cell shape."""
    pixels = arrays["pixel_values"]
    traces.append((sys_ids.shape, arrays["user_ids"].shape[1:], None if pixels is None else pixels.shape[1:]))
    model = nnx.merge(graphdef, state)
    statics = {k: arrays.pop(k) for k in ("scheme", "pad_id", "max_patches_per_image")}
    dim = arrays.pop("dim", None)

    def cell(a):
        return truncate_embeddings(
            embed_batch(model, sys_ids, header_ids, **a, **statics, prefix=prefix), dim
        )

    if arrays["user_ids"].shape[0] == 1:  # one cell: no batching transform at all
        return cell({k: None if v is None else v[0] for k, v in arrays.items()})[None]
    return jax.vmap(cell)(arrays)


def truncate_embeddings(emb, dim: int | None):
    """Matryoshka dimensions: the first ``dim`` coordinates, L2-normalised again (None: unchanged).
    Of a normalised vector, as Qwen3-VL-Embedding's users truncate its output (its model card claims
    MRL; its code returns the full vector); the same as truncating the pooled state, then normalising."""
    if dim is None or dim == emb.shape[-1]:
        return emb
    head = emb[..., :dim]
    return head / jnp.maximum(jnp.linalg.norm(head, axis=-1, keepdims=True), 1e-12)


def embed_batch(
    model, sys_ids, header_ids, user_ids, user_len, user_pos, next_pos, pixel_values, image_grid_thw, *,
    scheme, pad_id, max_patches_per_image, prefix=None, output_attentions=False, remat=None, scan_unroll=1,
):  # fmt: skip
    """Template placement, mask, positions, backbone, last-token pooling and normalisation.

    Pure and differentiable: the forward of both ``Embedder.encode`` and training. Arrays are those
    of ``g2e_jax.preprocess.collate``; the system segment and header are the role's constants. With
    ``prefix`` (``model.prefix_kv(sys_ids)``) the system segment is not run again: the program starts
    at the user segment, at the same positions, and gives the same embeddings. ``output_attentions``
    (static, for analysis) also returns each layer's attention probabilities ``[B, H, L, L]`` over
    the tokens the program runs (system segment, user segment, header, then padding). ``remat`` (a
    checkpoint policy: training's per-layer ``train.remat``) and ``scan_unroll`` go to the model's layer
    scans.
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
        max_patches_per_image=max_patches_per_image, output_attentions=output_attentions, remat=remat,
        scan_unroll=scan_unroll,
    )  # fmt: skip
    hidden, attentions = hidden if output_attentions else (hidden, None)
    last = n_sys + user_len + n_head - 1 - start
    pooled = hidden[jnp.arange(batch), last].astype(jnp.float32)
    emb = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    emb = constrain(emb, ("activation_batch", "activation_embed"))
    return (emb, attentions) if output_attentions else emb
