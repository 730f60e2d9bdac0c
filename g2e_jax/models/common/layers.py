"""Building blocks of every backbone's vision towers and text decoder: linears, activations, norms,
rotary, attention (fused or memory-bounded), stacks of layers and the scan that runs them
(with per-layer rematerialisation).

Every parameter declares the logical axes of its dimensions where it is made (``declared``, ``param``;
``linear`` and ``embed`` require them), and ``g2e_jax.mesh`` maps logical axes to mesh axes: a
parameter without declared axes is an error when the state is placed on a mesh; a stack's ``nnx.vmap``
puts ``layers`` in front."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from g2e_jax.mesh import declared

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def stack_layers(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
    """``n`` layers built by ``make(rngs)`` as ONE module whose every variable (parameters, adapter
    weights, random streams) has a leading layer axis of size ``n`` (``nnx.vmap`` over split random
    streams, so each layer is initialised from its own keys). Sharding metadata gets the logical axis
    "layers" in front. ``stack_size`` on the result marks it as a stack of layers; ``scan_layers`` runs it."""
    if n < 1:
        raise ValueError(f"a stack of layers needs at least one layer, got {n}")

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(rngs)

    stack = build(rngs)
    stack.stack_size = n
    return stack


def stack_paths(model: nnx.Module) -> list[tuple]:
    """The paths (tuples of keys) of the stacks of layers in ``model`` (modules with ``stack_size``)."""
    return [tuple(path) for path, m in nnx.iter_modules(model) if hasattr(m, "stack_size")]


def scan_layers(stack: nnx.Module, body, carry, xs=None, *, remat=None, unroll: int = 1, length: int | None = None,
                start: int = 0):
    """``body(layer, carry, x) -> (carry, y)`` over the layers of ``stack`` (``stack_layers``), in order:
    ``nnx.scan`` with the layer's state on axis 0 (its random streams advance per layer), ``xs`` the
    per-layer inputs (a pytree with a leading layer axis, or None) and the ``y`` stacked on axis 0.

    ``remat``: a checkpoint policy (``jax.checkpoint_policies``): each layer's body is checkpointed
    with it, so the backward keeps each layer's carry and recomputes the rest; None: no checkpoint.
    ``unroll``: layers per scan iteration (same result, same parameters). ``start``, ``length``: only
    layers ``start .. start + length - 1`` run (a slice of the stack, by default all from ``start``;
    the others' state is untouched), e.g. the vision blocks between two DeepStack taps."""
    size = stack.stack_size
    length = size - start if length is None else length
    if not (0 <= start and 0 < length and start + length <= size):
        raise ValueError(f"cannot run {length} layers from layer {start} of a stack of {size}")
    fn = body if remat is None else nnx.remat(body, policy=remat, prevent_cse=False)

    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=unroll,
              transform_metadata={nnx.PARTITION_NAME: "layers"})  # fmt: skip
    def step(layer, carry, x):
        return fn(layer, carry, x)

    # A copy of the stack (of the layers that run) made in this trace: nnx transforms refuse
    # variables of an outer trace, which a model called inside ``jax.jit`` / ``jax.eval_shape`` by
    # closure has. Its advanced random streams are written back.
    graph, state = nnx.split(stack)
    if length < size:
        state = jax.tree.map(lambda a: a[start : start + length], state)
    local = nnx.merge(graph, state, copy=True)
    out = step(local, carry, xs)
    rng = nnx.state(stack, nnx.RngState)
    if jax.tree.leaves(rng):
        new = nnx.state(local, nnx.RngState)
        if length < size:
            new = jax.tree.map(lambda a, h: a.at[start : start + length].set(h), rng, new)
        nnx.update(stack, new)
    return out


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def param(value, axes) -> nnx.Param:
    """An ``nnx.Param`` with its logical axes declared (one name per dimension)."""
    axes = tuple(axes)
    if len(axes) != jnp.ndim(value):
        raise ValueError(f"logical axes {axes} do not name the {jnp.ndim(value)} dimensions of the parameter")
    return nnx.Param(value, **declared(axes))


def linear(din: int, dout: int, *, axes: tuple[str, str], bias: bool, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:  # fmt: skip
    """A Linear initialised like transformers (normal, std 0.02; zero bias), its kernel's logical
    axes ``axes = (in_axis, out_axis)`` declared, and its bias's ``(out_axis,)``."""
    in_axis, out_axis = axes
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=declared((in_axis, out_axis)),
        bias_metadata=declared((out_axis,)),
        rngs=rngs,
    )


def embed(num: int, dim: int, *, axes: tuple[str, str], dtype, param_dtype, rngs: nnx.Rngs,
          **kw) -> nnx.Embed:  # fmt: skip
    """An ``nnx.Embed`` whose table's logical axes ``axes = (rows, width)`` are declared."""
    return nnx.Embed(num, dim, dtype=dtype, param_dtype=param_dtype, embedding_metadata=declared(axes),
                     rngs=rngs, **kw)  # fmt: skip


def layer_norm(dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """An ``nnx.LayerNorm`` with its scale and bias declared ``("norm",)`` (replicated)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         scale_metadata=declared(("norm",)), bias_metadata=declared(("norm",)))  # fmt: skip


ACTIVATION_BUDGET = 1 << 24  # elements of an MLP's hidden activations held at once: 64 MiB in float32


def map_rows(fn, x, width: int, module: nnx.Module):
    """``fn(x)`` for a row-wise ``fn`` over ``x [..., D]``, in groups of rows when ``rows * width``
    (its widest activation) exceeds ``ACTIVATION_BUDGET``: the same rows out, a bounded part of the
    hidden activations alive (eight photographs' 14k vision patches held 2 x 294 MB of MLP hidden
    states at 2B widths). Not while ``module`` draws random numbers (adapter dropout), whose state
    cannot change inside the loop."""
    rows = math.prod(x.shape[:-1])
    if rows * width <= ACTIVATION_BUDGET or jax.tree.leaves(nnx.state(module, nnx.RngState)):
        return fn(x)
    chunk = max(8, ACTIVATION_BUDGET // width)
    n = -(-rows // chunk)
    flat = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, n * chunk - rows), (0, 0)))
    out = jax.lax.map(fn, flat.reshape(n, chunk, x.shape[-1]))
    return out.reshape(n * chunk, out.shape[-1])[:rows].reshape(x.shape[:-1] + out.shape[-1:])


class GatedMLP(nnx.Module):
    """SwiGLU ``down(act(gate(x)) * up(x))``: the text decoder's MLP (no bias), Qwen2.5-VL's vision MLP."""

    def __init__(self, dim: int, hidden: int, act: str, *, axes: tuple[str, str], bias: bool, dtype,
                 param_dtype, rngs: nnx.Rngs):  # fmt: skip
        """``axes``: the logical names of (``dim``, ``hidden``)."""
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        embed_axis, mlp_axis = axes
        self.gate_proj = linear(dim, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.up_proj = linear(dim, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.down_proj = linear(hidden, dim, axes=(mlp_axis, embed_axis), **kw)
        self.act = activation(act)
        self.hidden = hidden

    def __call__(self, x):
        return map_rows(lambda h: self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h)), x, self.hidden,
                        self)  # fmt: skip


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 and cast back before the scale, as transformers does."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotates ``x [..., heads, head_dim]`` by angles broadcast over the heads axis."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


def attention_implementation(dtype) -> str | None:
    """cuDNN's fused (flash) kernel on GPU in half precision; XLA's otherwise (CPU, TPU, float32).
    ``G2E_JAX_ATTENTION=xla`` forces XLA's (to rule the fused kernel out when debugging)."""
    if os.environ.get("G2E_JAX_ATTENTION", "auto") == "xla":
        return None
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else None


SCORE_BUDGET = 1 << 26  # score elements one XLA attention call may hold: 256 MiB in float32


def attention(q, k, v, mask=None, *, kv_lengths=None):
    """Scaled dot-product attention with a float32 softmax (``jax.nn.dot_product_attention``).

    q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hk, D]`` with ``Hq % Hk == 0`` (grouped-query attention
    without materialising repeated keys); a boolean ``mask`` broadcastable to ``[B, 1, Lq, Lk]``
    and/or ``kv_lengths`` ``[B]`` (each row sees its first n keys: cuDNN takes that natively, a
    general mask only as a materialised bias). Fully masked query rows give a finite (uniform)
    result instead of NaN. Where cuDNN cannot take the shapes (head size, mask layout), XLA's
    implementation runs instead, with the same result.

    XLA's implementation materialises every score, so where ``B * Hq * Lq * Lk`` exceeds
    ``SCORE_BUDGET`` it runs over groups of rows, and of query blocks within a row, one group at a
    time (``lax.map``): each query's softmax is unchanged, and memory follows the budget instead of
    the batch (eight large images asked for 27 GB at once, issue 33).
    """
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    implementation = attention_implementation(q.dtype)
    if implementation is not None:
        try:
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=implementation
            )
        except (ValueError, NotImplementedError, TypeError, RuntimeError):
            pass
    return bounded_attention(q, k, v, mask, kv_lengths, budget=SCORE_BUDGET)


def bounded_attention(q, k, v, mask, kv_lengths, *, budget: int):
    """XLA's attention with at most about ``budget`` scores alive (see ``attention``)."""
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    if b * hq * lq * lk <= budget:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=kv_lengths)
    # Query blocks of a row (the whole row where it fits), then as many blocks per step as fit.
    block = lq if hq * lq * lk <= budget else max(1, budget // (hq * lk))
    nq = -(-lq // block)
    pad = nq * block - lq
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b * nq, block, hq, d)
    row = jnp.repeat(jnp.arange(b), nq)
    mb = None
    if mask is not None:
        mb = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, 1, nq, block, lk)
        mb = mb.transpose(0, 2, 1, 3, 4).reshape(b * nq, 1, block, lk)

    def one(xs):
        qi, r, mi = xs
        out = jax.nn.dot_product_attention(
            qi[None], k[r][None], v[r][None], mask=None if mi is None else mi[None],
            key_value_seq_lengths=None if kv_lengths is None else kv_lengths[r][None],
        )  # fmt: skip
        return out[0]

    per_step = max(1, budget // (hq * block * lk))
    out = jax.lax.map(one, (qb, row, mb), batch_size=per_step if per_step > 1 else None)
    return out.reshape(b, nq * block, hq, d)[:, :lq]


def attention_with_probs(q, k, v, mask=None):
    """``attention`` computed explicitly, also returning the probabilities ``[B, Hq, Lq, Lk]``
    (float32, as transformers' eager attention returns them with ``output_attentions=True``).

    For analysis only: it materialises every score, which the fused path above never does.
    """
    b, lq, hq, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, lq, hk, hq // hk, d).astype(jnp.float32)  # query heads grouped by their kv head
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    scores = scores.reshape(b, hq, lq, k.shape[1])
    if mask is not None:
        scores = jnp.where(jnp.broadcast_to(mask, scores.shape), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    grouped = probs.reshape(b, hk, hq // hk, lq, k.shape[1])
    out = jnp.einsum("bhgqk,bkhd->bqhgd", grouped.astype(v.dtype), v).reshape(b, lq, hq, d)
    return out, probs
