"""Device mesh and sharding rules: one regex table names each parameter's logical axes, one
table maps logical axes to mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded), and
``tensor`` (within-layer model parallel). On multi-slice pods each of data/fsdp has an in-slice
(ICI) and an across-slice (DCN) degree. The batch is sharded over ``data`` x ``fsdp``.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None: replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "merge": "tensor",
    "patch": None,
    "norm": None,
    "rank": None,
    # Activations: rows over the batch axes; the residual stream's width is never sharded over
    # ``fsdp`` (that axis only shards weights, gathered per layer), so GSPMD cannot follow a
    # weight's sharding into the hidden dimension.
    "activation_batch": BATCH_AXES,
    "activation_length": None,
    "activation_embed": None,
}

# Parameter path (regex, full match) -> logical axes of each dimension. The first match wins;
# parameters matching nothing are replicated.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"text\.embed_tokens\.embedding", ("vocab", "embed")),
    (r"text\.layers\.\d+\.attn\.[qkv]_proj\.kernel", ("embed", "heads")),
    (r"text\.layers\.\d+\.attn\.[qkv]_proj\.bias", ("heads",)),
    (r"text\.layers\.\d+\.attn\.o_proj\.kernel", ("heads", "embed")),
    (r"text\.layers\.\d+\.mlp\.(gate|up)_proj\.kernel", ("embed", "mlp")),
    (r"text\.layers\.\d+\.mlp\.down_proj\.kernel", ("mlp", "embed")),
    (r"lm_head\.kernel", ("embed", "vocab")),
    (r"visual\.patch_embed\.kernel", ("patch", "vision_embed")),
    (r"visual\.blocks\.\d+\.attn\.qkv\.kernel", ("vision_embed", "vision_heads")),
    (r"visual\.blocks\.\d+\.attn\.qkv\.bias", ("vision_heads",)),
    (r"visual\.blocks\.\d+\.attn\.proj\.kernel", ("vision_heads", "vision_embed")),
    (r"visual\.blocks\.\d+\.mlp\.fc1\.kernel", ("vision_embed", "vision_mlp")),
    (r"visual\.blocks\.\d+\.mlp\.fc1\.bias", ("vision_mlp",)),
    (r"visual\.blocks\.\d+\.mlp\.fc2\.kernel", ("vision_mlp", "vision_embed")),
    (r"visual\.blocks\.\d+\.mlp\.(gate|up)_proj\.kernel", ("vision_embed", "vision_mlp")),  # Qwen2.5-VL
    (r"visual\.blocks\.\d+\.mlp\.(gate|up)_proj\.bias", ("vision_mlp",)),
    (r"visual\.blocks\.\d+\.mlp\.down_proj\.kernel", ("vision_mlp", "vision_embed")),
    (r"visual\.merger\.fc1\.kernel", ("merge", "vision_embed")),
    (r"visual\.merger\.fc2\.kernel", ("merge", "embed")),
    (r".*\.(scale|bias)", ("norm",)),
    (r".*\.(lora_a|lora_b|magnitude)", ("rank", "rank")),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, dcn_data: int = 1, dcn_fsdp: int = 1,
              devices=None) -> Mesh:  # fmt: skip
    """A (data, fsdp, tensor) mesh over all devices (``-1``: whatever is left for ``data``).

    ``dcn_*`` > 1 builds a hybrid mesh for multi-slice pods: the DCN degrees multiply the ICI ones,
    and DCN-crossing collectives stay on the data-parallel axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    dcn = dcn_data * dcn_fsdp
    if n % dcn:
        raise ValueError(
            f"{n} devices are not divisible by the DCN degrees dcn_data={dcn_data} x dcn_fsdp={dcn_fsdp}"
        )
    per_slice = n // dcn
    if data == -1:
        if per_slice % (fsdp * tensor):
            raise ValueError(
                f"{per_slice} devices per slice are not divisible by fsdp={fsdp} x tensor={tensor}"
            )
        data = per_slice // (fsdp * tensor)
    if data * fsdp * tensor != per_slice:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {per_slice} devices per slice "
                         f"({n} devices, {dcn} slices)")  # fmt: skip
    axis_types = (AxisType.Auto,) * 3
    if dcn == 1:
        return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh(
        (data, fsdp, tensor), (dcn_data, dcn_fsdp, 1), devices=devices
    )
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_spec(names, shape, mesh: Mesh) -> P:
    """Logical names -> PartitionSpec; a dimension the mesh axes do not divide stays replicated."""
    return explain_spec(names, shape, mesh)[0]


def explain_spec(names, shape, mesh) -> tuple[P, list[str]]:
    """``logical_spec`` and, per dimension whose rule asked for sharding but could not get it, why."""
    out, used, why = [], set(), []
    for dim, (name, size) in enumerate(zip(names, shape)):
        axes = LOGICAL_RULES.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1 and a not in used)
        degree = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and size % degree:
            why.append(f"dim {dim} ({name}) = {size} is not divisible by {'x'.join(axes)} = {degree}")
        if not axes or size % degree:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out), why


def param_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    return param_rule(path, ndim)[1]


def param_rule(path: str, ndim: int) -> tuple[str | None, tuple[str | None, ...]]:
    """(the PARAM_AXES pattern that matched, or None, and the logical axes of each dimension)."""
    for pattern, names in PARAM_AXES:
        if re.fullmatch(pattern, path):
            return pattern, tuple(names[:ndim]) + (None,) * max(0, ndim - len(names))
    return None, (None,) * ndim


def _leaf_name(path) -> str:
    keys = [k for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]  # drop Variable's ".value"
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def constrain(x, names):
    """``with_sharding_constraint`` by logical names under ``jax.set_mesh``; a no-op without a mesh.

    The model calls it on its activations (as MaxText and flax's gemma example do), so the layout of
    the residual stream is what the table says, not whatever GSPMD propagates from the weights.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(_activation_names(names), x.shape, mesh))


_LOCAL_ROWS = []  # >0 while tracing inside a per-cell vmap (see ``local_rows``)


def _activation_names(names):
    if _LOCAL_ROWS:
        return tuple(None if n == "activation_batch" else n for n in names)
    return tuple(names)


class local_rows:
    """Within a ``vmap`` over cells that are sharded over the batch axes (the training step), a
    cell's rows live on one device group: ``activation_batch`` is then left replicated."""

    def __enter__(self):
        _LOCAL_ROWS.append(1)

    def __exit__(self, *exc):
        _LOCAL_ROWS.pop()


def state_shardings(state: nnx.State, mesh: Mesh):
    """A NamedSharding for every array of an NNX state (same tree structure)."""

    def sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, logical_spec(param_axes(_leaf_name(path), len(shape)), shape, mesh))

    return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_dim] = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(*spec))


def shard_model(model, mesh: Mesh):
    """Moves every parameter of ``model`` to its sharding (in place) and returns the shardings."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return shardings
