"""The training step as one pure, shardable function, with or without GradCache.

Forward: ``embed_batch`` (the Embedder's own program) over every cell of the batch, then the
contrastive loss over the global batch. GradCache (Gao et al. 2021) makes the step two-pass: embed
every chunk without keeping activations, take the loss and its gradient with respect to the
embeddings, then re-run each chunk and back-propagate its cached embedding gradient; the parameter
gradient is the same as the full-batch one, but only one chunk's activations live at a time.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from g2e_jax.adapters.lora import reseed_dropout
from g2e_jax.programs.encode import embed_batch
from g2e_jax.train.loss import contrastive_loss
from g2e_jax.mesh import local_rows

# ``train.remat``: "full" / "dots" checkpoint a chunk's whole forward (its backward still holds every
# layer's activations at once); "layers" / "layers_dots" checkpoint each decoder layer and vision block,
# so the backward holds one layer's activations plus every layer's input (the policy is the layer scans'
# ``remat`` argument, ``g2e_jax.models.common.layers.scan_layers``).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "layers": jax.checkpoint_policies.nothing_saveable,
    "layers_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
PER_LAYER_REMAT = ("layers", "layers_dots")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    temperature: float = 0.02
    grad_cache: bool = False
    remat: str = "none"  # rematerialisation, see REMAT_POLICIES: none | full | dots | layers | layers_dots
    mask_same_target: bool = True  # target_ids filter
    mask_same_query: bool = True  # query_ids filter
    fn_query_threshold: float | None = None
    fn_margin: float | None = None
    hard_k: int | None = None
    scheme: str = "gen2embed"
    pad_id: int = 0
    max_patches_per_image: int | None = None
    # The system segment's keys and values once per chunk and role instead of once per row (see
    # g2e_jax.embed). The same loss and gradients; adapter dropout masks over those tokens are then
    # shared by the chunk's rows.
    prefix_cache: bool = True
    scan_unroll: int = 1  # layers per iteration of the layer scans (same result; compile time vs speed)

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll must be at least 1, got {self.scan_unroll}")

    @property
    def layer_remat(self):
        """The checkpoint policy of each layer's scan body: ``remat`` layers / layers_dots, else
        ``dots_saveable`` (the matmul outputs kept, the elementwise rest recomputed in the backward).

        Measured (2B widths, 2 layers, GradCache, one CPU device): with no checkpoint the layer scan
        keeps every elementwise intermediate of every layer for its backward, 853 MiB of temporaries
        against 597 MiB for the unrolled layers it replaced (whose XLA fused them into the backward
        instead); with ``dots_saveable`` 541 MiB (the full-depth 7B step: 966 -> 373 GiB per device)."""
        if self.remat in PER_LAYER_REMAT:
            return REMAT_POLICIES[self.remat]
        return jax.checkpoint_policies.dots_saveable


def _embed_chunk(model, side: dict, consts, cfg: StepConfig, rng=None):
    """One chunk ``[G, c, ...]`` -> embeddings ``[G * c, D]`` (cells vmapped: sharded over devices).

    With ``rng`` (adapter dropout) each cell merges its own copy of the model, seeded with
    ``fold_in(rng, cell)``: NNX random streams are mutable state, and a stream of the outer trace
    cannot advance inside the vmap."""
    sys_ids, header_ids = consts
    layers = dict(remat=cfg.layer_remat, scan_unroll=cfg.scan_unroll)
    prefix = model.prefix_kv(sys_ids, **layers) if cfg.prefix_cache and sys_ids.shape[0] else None
    graph, state = nnx.split(model)

    def cell(arrays, index):
        m = model
        if rng is not None:
            m = nnx.merge(graph, state, copy=True)
            reseed_dropout(m, jax.random.fold_in(rng, index))
        return embed_batch(m, sys_ids, header_ids, **arrays, scheme=cfg.scheme, pad_id=cfg.pad_id,
                           max_patches_per_image=cfg.max_patches_per_image, prefix=prefix, **layers)  # fmt: skip

    cells = jax.tree.leaves(side)[0].shape[0]
    with local_rows():  # a cell's rows stay on its devices; the cells are what is sharded
        emb = jax.vmap(cell)(side, jnp.arange(cells))
    return emb.reshape(-1, emb.shape[-1])


def _loss(q, t, batch, cfg: StepConfig):
    """Rows in (chunk, cell, row) order, the order the embeddings are concatenated in."""
    return contrastive_loss(
        q, t, temperature=cfg.temperature, valid=batch["valid"].reshape(-1),
        query_ids=batch["query_ids"].reshape(-1) if cfg.mask_same_query else None,
        target_ids=batch["target_ids"].reshape(-1) if cfg.mask_same_target else None,
        fn_query_threshold=cfg.fn_query_threshold, fn_margin=cfg.fn_margin, hard_k=cfg.hard_k,
    )  # fmt: skip


def _chunk(side: dict, k):
    return jax.tree.map(lambda x: x[k], side)


def loss_and_grads(graphdef, params, rest, batch, consts, cfg: StepConfig, rng=None):
    """(loss, metrics), d loss / d params — plain or GradCache, by ``cfg.grad_cache``.

    ``rng`` seeds dropout (adapters): each (chunk, side) gets ``fold_in(rng, 2 * chunk + side)``, so
    GradCache's second pass sees the same masks as its first, and a resumed run the same as an
    uninterrupted one.
    """
    chunks = batch["query"]["user_ids"].shape[0]
    policy = REMAT_POLICIES[cfg.remat]

    def embed(p, side, side_consts, index):
        def forward(p, side):
            # A fresh copy per trace: the random streams in ``rest`` belong to the caller's trace.
            model = nnx.merge(graphdef, p, rest, copy=True)
            key = None
            if rng is not None:
                key = jax.random.fold_in(rng, index)
                reseed_dropout(model, key)  # the prefix's dropout
            return _embed_chunk(model, side, side_consts, cfg, key)

        if cfg.remat not in ("none", *PER_LAYER_REMAT):  # per layer: the layer scans' remat (_embed_chunk)
            forward = jax.checkpoint(forward, policy=policy)
        return forward(p, side)

    if not cfg.grad_cache:

        def full_loss(p):
            q = [embed(p, _chunk(batch["query"], k), consts["query"], 2 * k) for k in range(chunks)]
            t = [embed(p, _chunk(batch["target"], k), consts["target"], 2 * k + 1) for k in range(chunks)]
            return _loss(jnp.concatenate(q), jnp.concatenate(t), batch, cfg)

        return jax.value_and_grad(full_loss, has_aux=True)(params)

    # Pass 1: embeddings of every chunk, no activations kept.
    ks = jnp.arange(chunks)

    def embed_all(side, side_consts, which):
        return jax.lax.map(lambda xs: embed(params, xs[1], side_consts, 2 * xs[0] + which), (ks, side))

    q_all = jax.lax.stop_gradient(embed_all(batch["query"], consts["query"], 0))  # [K, G*c, D]
    t_all = jax.lax.stop_gradient(embed_all(batch["target"], consts["target"], 1))
    dim = q_all.shape[-1]
    (loss, metrics), (dq, dt) = jax.value_and_grad(
        lambda q, t: _loss(q.reshape(-1, dim), t.reshape(-1, dim), batch, cfg), argnums=(0, 1), has_aux=True
    )(q_all, t_all)

    # Pass 2: each chunk again, back-propagating its cached embedding gradient.
    def body(acc, xs):
        k, side_q, side_t, g_q, g_t = xs

        def surrogate(p):
            q = embed(p, side_q, consts["query"], 2 * k)
            return jnp.vdot(q, g_q) + jnp.vdot(embed(p, side_t, consts["target"], 2 * k + 1), g_t)

        return jax.tree.map(jnp.add, acc, jax.grad(surrogate)(params)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(body, zeros, (ks, batch["query"], batch["target"], dq, dt))
    return (loss, metrics), grads


def lr_schedule(learning_rate, total_steps, warmup_steps=0) -> optax.Schedule:
    """The reference's learning rate at optimizer step ``count`` (0 for the first step): transformers'
    get_linear_schedule_with_warmup, lr * count / warmup, then lr * (total - count) / (total - warmup);
    with no warm-up the first step already uses the full rate. The optimizer and the logs both use it.

    The three numbers may be arrays, traced ones included (no branch on their values): the trainer
    passes them to its compiled step as arguments (``schedule_values``), so a run resumed with more
    steps, or another learning rate, reads the same program back from the compilation cache."""

    def linear(count, start, end, steps):  # optax.linear_schedule's arithmetic, to the last bit
        frac = 1 - jnp.clip(count, 0, steps) / steps
        return (start - end) * frac + end

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        rising = linear(count, 0.0, learning_rate, jnp.maximum(warmup_steps, 1))
        falling = linear(jnp.where(warmup_steps > 0, count - warmup_steps, count), learning_rate, 0.0,
                         jnp.maximum(total_steps - jnp.maximum(warmup_steps, 0), 1))  # fmt: skip
        return jnp.where(count < warmup_steps, rising, falling)

    return schedule


def schedule_values(learning_rate: float, total_steps: int, warmup_steps: int = 0) -> dict:
    """``lr_schedule``'s numbers as float32 scalars: an argument of the trainer's step, not a constant
    of its program."""
    return {
        "learning_rate": np.float32(learning_rate),
        "total_steps": np.float32(total_steps),
        "warmup_steps": np.float32(warmup_steps),
    }


def make_optimizer(*, learning_rate, total_steps, warmup_steps=0, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:  # fmt: skip
    """AdamW with a linear warm-up then linear decay to zero (the reference's schedule), clipped. The
    schedule's numbers may be traced (``lr_schedule``); the state's structure does not depend on them."""
    schedule = lr_schedule(learning_rate, total_steps, warmup_steps)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(schedule, weight_decay=weight_decay))
    return optax.chain(*parts)


def train_step(graphdef, params, rest, opt_state, batch, consts, rng=None, *, tx, cfg: StepConfig):
    """One optimisation step; returns (params, opt_state, metrics). Pure: jit and shard it.

    A step whose loss or gradient norm is not finite changes nothing: parameters and optimizer state
    (Adam's moments and count) come back as they went in, and ``metrics["finite"]`` is 0. A select
    rather than ``optax.apply_if_finite``, so the optimizer state (and its checkpoints and
    shardings) keeps one structure."""
    (loss, metrics), grads = loss_and_grads(graphdef, params, rest, batch, consts, cfg, rng)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (new_params, new_opt_state), (params, opt_state)
    )
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.int32))
    return params, opt_state, metrics
