"""Know before you pay: where every parameter lives and how much a compiled program needs, before step 1.

``sharding_report`` lists each parameter's logical axes (declared where it was made), its mesh
sharding and its bytes per device, the optimizer state's bytes per device, and every parameter that
fell back to replication (no logical axes declared, or the mesh does not divide a dimension that its
axis's rule shards). ``AheadOfTime`` lowers and compiles a jitted function before its first call,
reports ``memory_analysis()`` and refuses a program that cannot fit the device, naming what it needs
and the mesh change that would help; its executables are the ones the steps then run.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from g2e_jax.aot import AheadOfTime, device_memory_limit, fmt_bytes
from g2e_jax.io import write_atomic
from g2e_jax.mesh import NO_AXES, declared_axes, explain_spec


def _bytes(leaf) -> tuple[int, int]:
    """(total bytes, bytes on one device) of an array or a ShapeDtypeStruct with a sharding."""
    shape, item = tuple(leaf.shape), np.dtype(leaf.dtype).itemsize
    sharding = getattr(leaf, "sharding", None)
    local = sharding.shard_shape(shape) if sharding is not None else shape
    return int(np.prod(shape)) * item, int(np.prod(local)) * item


@dataclasses.dataclass
class ParamRow:
    path: str
    shape: tuple
    dtype: str
    logical: tuple
    spec: str
    total: int
    per_device: int
    trainable: bool
    fallback: str | None  # why it is replicated against its axes' rules (None: as the table says)

    @property
    def replicated(self) -> bool:
        return self.total == self.per_device


@dataclasses.dataclass
class ShardingReport:
    mesh: dict
    rows: list[ParamRow]
    opt_total: int
    opt_per_device: int

    @property
    def fallbacks(self) -> list[ParamRow]:
        return [r for r in self.rows if r.fallback]

    def bytes(self, rows=None) -> tuple[int, int]:
        rows = self.rows if rows is None else rows
        return sum(r.total for r in rows), sum(r.per_device for r in rows)

    def summary(self) -> str:
        total, local = self.bytes()
        trainable = self.bytes([r for r in self.rows if r.trainable])
        meant = self.bytes([r for r in self.rows if r.replicated and not r.fallback])
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"mesh {mesh} ({int(np.prod(list(self.mesh.values())))} devices)",
            f"parameters: {fmt_bytes(total)} in {len(self.rows)} arrays, {fmt_bytes(local)} per device "
            f"(trainable {fmt_bytes(trainable[0])}, {fmt_bytes(trainable[1])} per device; replicated by rule "
            f"{fmt_bytes(meant[1])})",
            f"optimizer state: {fmt_bytes(self.opt_total)}, {fmt_bytes(self.opt_per_device)} per device",
        ]
        if self.fallbacks:
            lost = self.bytes(self.fallbacks)
            lines.append(f"WARNING: {len(self.fallbacks)} parameters fell back to replication "
                         f"({fmt_bytes(lost[1])} per device):")
            groups: dict[tuple, int] = {}
            for r in self.fallbacks:  # one line per layer pattern on the console; every one in the file
                key = (re.sub(r"\.\d+\.", ".*.", r.path), r.fallback)
                groups[key] = groups.get(key, 0) + 1
            lines += [f"  {p} (x{n}): {why}" for (p, why), n in groups.items()]
        return "\n".join(lines)

    def table(self) -> str:
        """Every parameter: path, shape, dtype, logical axes, sharding, bytes per device, why replicated."""
        head = ("parameter", "shape", "dtype", "logical axes", "sharding", "per device", "note")
        body = [
            (r.path + ("" if r.trainable else " (frozen)"), "x".join(map(str, r.shape)) or "()", r.dtype,
             ",".join(str(n) for n in r.logical) or "-", r.spec, fmt_bytes(r.per_device),
             f"FELL BACK: {r.fallback}" if r.fallback else "")
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip()
                         for line in [head, *body])

    def text(self) -> str:
        return self.summary() + "\n\n" + self.table() + "\n"

    def write(self, path: str | Path) -> None:
        write_atomic(path, self.text())


def sharding_report(params, rest, opt_state, mesh) -> ShardingReport:
    """The report for trainable ``params`` and frozen ``rest`` (NNX states) and the optimizer state,
    all either arrays or ``jax.ShapeDtypeStruct`` with shardings (abstract: no weights needed)."""
    rows = []
    for trainable, state in ((True, params), (False, rest)):
        for keys, variable in nnx.to_flat_state(state):
            if not isinstance(variable, nnx.Param):
                continue  # dropout RNG state and counters
            path, leaf = ".".join(map(str, keys)), variable.get_value()
            logical = declared_axes(variable)
            total, local = _bytes(leaf)
            if logical is None:
                logical, fallback = (None,) * len(leaf.shape), NO_AXES if leaf.shape else None
            else:
                fallback = "; ".join(explain_spec(logical, leaf.shape, mesh)[1]) or None
            rows.append(ParamRow(path, tuple(leaf.shape), str(leaf.dtype), logical,
                                 str(getattr(leaf.sharding, "spec", "")), total, local, trainable, fallback))
    rows.sort(key=lambda r: r.path)
    opt = [_bytes(x) for x in jax.tree.leaves(opt_state) if hasattr(x, "shape") and x.dtype != object]
    return ShardingReport(dict(mesh.shape), rows, sum(t for t, _ in opt), sum(d for _, d in opt))


# --- ahead-of-time compilation with a memory check ------------------------------------------------------


def mesh_advice(mesh_cfg: dict, devices: int) -> str:
    """The mesh change that shards more of the state: more fsdp first, then the activation knobs."""
    fsdp, tensor = mesh_cfg.get("fsdp", 1), mesh_cfg.get("tensor", 1)
    most = devices // max(tensor, 1)
    if fsdp < most:
        return (f"shard parameters and optimizer state over more devices: raise mesh.fsdp (now {fsdp}), "
                f"e.g. --config.mesh.fsdp={most}; or cut activations with train.grad_cache=True, a smaller "
                "train.rows_per_cell or train.remat=layers")
    return ("the state is already sharded over every device (mesh.fsdp = "
            f"{fsdp}): cut activations with train.grad_cache=True, a smaller train.rows_per_cell, "
            "train.remat=layers, or use more devices")


def abstract_batch(shape, pad_id: int, sharding_for, sides: dict | None = None):
    """``jax.ShapeDtypeStruct`` leaves of the largest global batch ``shape`` allows (the capacity,
    as without shape buckets, or ``sides``, ``build_batch``'s), with the batch shardings: built from
    a one-cell batch, no data."""
    from g2e_jax.train.batch import build_batch

    one = build_batch([], dataclasses.replace(shape, chunks=1, cells=1), pad_id, sides=sides)

    def grow(x):
        if x is None:
            return None
        dims = (shape.chunks, shape.cells) + x.shape[2:]
        dtype = jax.dtypes.canonicalize_dtype(x.dtype)
        return jax.ShapeDtypeStruct(dims, dtype, sharding=sharding_for(len(dims)))

    return jax.tree.map(grow, one)


def before_first_step(run, jitted, batch, consts, key, *, lead: bool) -> AheadOfTime:
    """The sharding report (``workdir/sharding.txt`` and a console summary), then the training step
    compiled ahead of time for ``batch`` (abstract) with its memory checked against the device."""
    report = sharding_report(run.params, run.rest, run.opt_state, run.mesh)
    if lead:
        report.write(run.workdir / "sharding.txt")
        print(report.summary(), flush=True)
    limit, source = device_memory_limit(run.cfg.train.get("device_memory_gb"))
    step = AheadOfTime(jitted, "training step", mesh=run.mesh, limit=limit, limit_source=source,
                       advice=mesh_advice(run.cfg.mesh.to_dict(), jax.device_count()))
    step.compile(run.params, run.rest, run.opt_state, batch, consts, key, run.schedule)
    if lead:
        print(step.describe(), flush=True)
    return step


def abstract_train_state(build_model, adapter, tx, mesh):
    """(graphdef, params, rest, opt_state) of a model as ``jax.ShapeDtypeStruct`` with the shardings
    the trainer gives them: plan a 7B run on a laptop, no weights allocated. ``build_model()``
    returns the NNX backbone (it runs under ``nnx.eval_shape``)."""
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from g2e_jax.adapters.lora import apply_adapters, trainable_filter
    from g2e_jax.mesh import state_shardings

    def build():
        model = build_model()
        apply_adapters(model, adapter, rngs=nnx.Rngs(params=0, dropout=1))
        return model

    graphdef, params, rest = nnx.split(nnx.eval_shape(build), trainable_filter(adapter), ...)

    def place(state):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                            state_shardings(state, mesh))

    params, rest = place(params), place(rest)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, P())
    opt_state = optax.tree_map_params(
        tx, lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(tx.init, params),
        shardings, transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    )
    return graphdef, params, rest, opt_state
