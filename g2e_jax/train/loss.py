"""InfoNCE over the global batch, with in-step false-negative filters.

Row i's positive is ``t[i]``; every other row's positive is a negative for it (the whole global
batch: mutually hard clusters put hard negatives next to each other). Before the softmax, known
false negatives can be masked: candidates with the same content as row i's positive
(``target_ids``) or the same query (``query_ids``), candidates whose query is too similar to row
i's (``fn_query_threshold``), candidates scoring above the positive by more than ``fn_margin``;
then optionally only the ``hard_k`` hardest remaining negatives are kept. With every filter off this
is exactly the reference loss: cross-entropy of ``q @ t.T / temperature`` with target ``i``.

``contrastive_loss`` works on global arrays: under ``jit`` on a batch sharded across devices, XLA
gathers what the matmul needs. ``sharded_contrastive_loss`` does the same explicitly with
``shard_map`` + all-gather (each device scores its own rows against the gathered pool).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

NEG_INF = -1e30  # finite: a fully masked row stays NaN-free


def _keep_mask(q_rows, q_all, scores, rows, valid_all, valid_rows, *, query_ids, target_ids,
               fn_query_threshold, fn_margin, hard_k):  # fmt: skip
    """``[n, N]``: which candidates stay in each row's negative pool (its positive is not a negative),
    and how many real negatives the filters removed. Filters act on values, not gradients."""
    total = q_all.shape[0]
    cols = jnp.arange(total)
    scores = jax.lax.stop_gradient(scores)
    base = (rows[:, None] != cols[None, :]) & valid_all[None, :] & valid_rows[:, None]
    keep = base
    if target_ids is not None:
        keep &= target_ids[rows][:, None] != target_ids[None, :]
    if query_ids is not None:
        keep &= query_ids[rows][:, None] != query_ids[None, :]
    if fn_query_threshold is not None:
        keep &= jax.lax.stop_gradient(q_rows @ q_all.T) < fn_query_threshold
    if fn_margin is not None:
        positive = scores[jnp.arange(rows.shape[0]), rows]
        keep &= scores <= positive[:, None] + fn_margin
    if hard_k is not None:
        # Ties at the k-th score keep all tied candidates.
        ranked = jnp.where(keep, scores, -jnp.inf)
        kth = jax.lax.top_k(ranked, min(hard_k, total))[0][:, -1]
        keep &= ranked >= kth[:, None]
    return keep, (base & ~keep).sum()


def _sums(scores, keep, rows, valid_rows, temperature):
    """Per-shard sums; the loss and metrics are their ratios (so shards combine with one psum)."""
    n, total = scores.shape
    logits = scores.astype(jnp.float32)
    positive = logits[jnp.arange(n), rows]
    is_positive = rows[:, None] == jnp.arange(total)[None, :]
    masked = jnp.where(keep | is_positive, logits, NEG_INF)
    per_row = jax.nn.logsumexp(masked / temperature, axis=-1) - positive / temperature
    w = valid_rows.astype(jnp.float32)
    detached = jax.lax.stop_gradient(logits)
    return {
        "loss": (per_row * w).sum(),
        "rows": w.sum(),
        "correct": ((jnp.argmax(masked, axis=-1) == rows) & valid_rows).sum().astype(jnp.float32),
        "pos": (detached[jnp.arange(n), rows] * w).sum(),
        "neg": jnp.where(keep, detached, 0.0).sum(),
        "negatives": keep.sum().astype(jnp.float32),
    }


def _finish(sums, masked):
    rows = jnp.maximum(sums["rows"], 1.0)
    loss = sums["loss"] / rows
    return loss, {
        "loss": loss,
        "accuracy": sums["correct"] / rows,
        "pos_score": sums["pos"] / rows,
        "neg_score": sums["neg"] / jnp.maximum(sums["negatives"], 1.0),
        "masked": masked,
    }


def contrastive_loss(q, t, *, temperature: float = 0.02, query_ids=None, target_ids=None,
                     fn_query_threshold: float | None = None, fn_margin: float | None = None,
                     hard_k: int | None = None, valid=None):  # fmt: skip
    """``(loss, metrics)`` over the global ``q [N, D]``, ``t [N, D]`` (L2-normalised embeddings).

    ``valid [N]`` marks real rows (padding rows give no loss and are no candidates). Metrics: loss,
    in-batch top-1 accuracy, mean positive and negative score (cosine), and how many negatives the
    filters masked.
    """
    n = q.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    rows = jnp.arange(n)
    scores = q @ t.T  # one matmul for both the filters and the logits
    keep, masked = _keep_mask(q, q, scores, rows, valid, valid, query_ids=query_ids, target_ids=target_ids,
                              fn_query_threshold=fn_query_threshold, fn_margin=fn_margin, hard_k=hard_k)  # fmt: skip
    return _finish(_sums(scores, keep, rows, valid, temperature), masked)


def sharded_contrastive_loss(mesh, batch_axes=("data", "fsdp"), *, temperature: float = 0.02,
                             fn_query_threshold: float | None = None, fn_margin: float | None = None,
                             hard_k: int | None = None):  # fmt: skip
    """``contrastive_loss`` as an explicit ``shard_map`` over the batch axes: each device all-gathers
    the pool (``t``; ``q`` and the ids for the filters), scores its own rows, and the sums are
    ``psum``-ed. The all-gather's transpose returns every row's gradient to the device owning it."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    spec = P(axes)
    filters = dict(fn_query_threshold=fn_query_threshold, fn_margin=fn_margin, hard_k=hard_k)

    def local(q, t, valid, query_ids, target_ids):
        def gather(x):
            return None if x is None else jax.lax.all_gather(x, axes, tiled=True)

        q_all, t_all, valid_all = gather(q), gather(t), gather(valid)
        rows = jax.lax.axis_index(axes) * q.shape[0] + jnp.arange(q.shape[0])
        scores = q @ t_all.T
        keep, masked = _keep_mask(q, q_all, scores, rows, valid_all, valid, query_ids=gather(query_ids),
                                  target_ids=gather(target_ids), **filters)  # fmt: skip
        sums = jax.tree.map(lambda x: jax.lax.psum(x, axes), _sums(scores, keep, rows, valid, temperature))
        return _finish(sums, jax.lax.psum(masked, axes))

    @jax.jit
    def loss_fn(q, t, valid=None, query_ids=None, target_ids=None):
        valid = jnp.ones((q.shape[0],), bool) if valid is None else valid.astype(bool)
        specs = (spec, spec, spec, None if query_ids is None else spec, None if target_ids is None else spec)
        fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()), check_vma=False)
        return fn(q, t, valid, query_ids, target_ids)

    return loss_fn
