"""Device mesh and sharding rules: every parameter declares the logical axes of its dimensions where it
is made (``declared``: its Variable's ``out_sharding`` metadata), and one table, ``LOGICAL_RULES``, maps
logical axes to mesh axes (MaxText's ``logical_axis_rules``).

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded), and
``tensor`` (within-layer model parallel). On multi-slice pods each of data/fsdp has an in-slice
(ICI) and an across-slice (DCN) degree. The batch is sharded over ``data`` x ``fsdp``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None: replicated). Every logical name a parameter or an activation
# declares is here; a name that is not is an error, not a silent replication.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    # A stack of layers' leading axis (``nnx.vmap`` adds it to each layer's declared axes): never
    # sharded, each device holds its shard of every layer.
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "merge": "tensor",
    # Replicated by rule: the patch vectors' (pixels) side of a patch embedding, a vision tower's
    # learned positions, norm scales and biases, and the low-rank side of adapters.
    "patch": None,
    "vision_positions": None,
    "norm": None,
    "rank": None,
    # Activations: rows over the batch axes; the residual stream's width is never sharded over
    # ``fsdp`` (that axis only shards weights, gathered per layer), so GSPMD cannot follow a
    # weight's sharding into the hidden dimension.
    "activation_batch": BATCH_AXES,
    "activation_length": None,
    "activation_embed": None,
}

NO_AXES = "no logical axes declared where it was made"


def declared(axes) -> dict:
    """A Variable's metadata naming the logical axis of each of its dimensions (``out_sharding``),
    for ``nnx.Param(value, **declared(axes))`` or a layer's ``kernel_metadata``. Never sharded at
    construction (``eager_sharding=False``), not even under ``jax.set_mesh``: models are built
    abstractly or on the host, and placed by ``state_shardings`` / ``shard_model``."""
    return {"out_sharding": tuple(axes), "eager_sharding": False}


def declared_axes(variable) -> tuple | None:
    """The logical axes a Variable declares (None: none declared)."""
    axes = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None
    return None if axes is None else tuple(axes)


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
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not name the {len(shape)} dimensions of shape "
                         f"{tuple(shape)}")  # fmt: skip
    out, used, why = [], set(), []
    for dim, (name, size) in enumerate(zip(names, shape)):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} is not in g2e_jax.mesh.LOGICAL_RULES")
        axes = LOGICAL_RULES[name] if name is not None else None
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


def variable_spec(path: str, variable, mesh: Mesh) -> P:
    """The PartitionSpec of one Variable of a model's state at ``path``: its declared logical axes
    through ``LOGICAL_RULES``. Random-stream state (dropout keys and counts) is replicated; a
    parameter (or any other array) that declares no axes is an error naming its path."""
    shape = tuple(getattr(variable, "shape", ()))
    axes = declared_axes(variable)
    if axes is None:
        if isinstance(variable, nnx.RngState) or not shape:
            return P()
        raise ValueError(f"{path}: {NO_AXES} (name the logical axes of its {len(shape)} dimensions where it "
                         "is made: g2e_jax.mesh.declared, models.common.layers.linear / param)")  # fmt: skip
    try:
        return logical_spec(axes, shape, mesh)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def state_shardings(state: nnx.State, mesh: Mesh):
    """A NamedSharding for every array of an NNX state (same tree structure), from the logical
    axes each parameter declares (``variable_spec``)."""

    def sharding(path, variable):
        spec = variable_spec(_leaf_name(path), variable, mesh)
        return jax.tree.map(lambda _: NamedSharding(mesh, spec), variable)

    return jax.tree_util.tree_map_with_path(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
