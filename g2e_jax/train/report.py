"""Know before you pay: where every parameter lives and how much a compiled program needs, before step 1.

``sharding_report`` lists each parameter's logical axes, its mesh sharding and its bytes per device,
the optimizer state's bytes per device, and every parameter that fell back to replication (no rule
matched, or the mesh does not divide a dimension its rule shards). ``AheadOfTime`` lowers and
compiles a jitted function before its first call, reports ``memory_analysis()`` and refuses a
program that cannot fit the device, naming what it needs and the mesh change that would help; its
executables are the ones the steps then run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from g2e_jax.io import write_atomic
from g2e_jax.mesh import explain_spec, param_rule

GIB = 1 << 30


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


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
    fallback: str | None  # why it is replicated against its rule (None: as the table says)

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
            f"parameters: {_fmt(total)} in {len(self.rows)} arrays, {_fmt(local)} per device "
            f"(trainable {_fmt(trainable[0])}, {_fmt(trainable[1])} per device; replicated by rule "
            f"{_fmt(meant[1])})",
            f"optimizer state: {_fmt(self.opt_total)}, {_fmt(self.opt_per_device)} per device",
        ]
        if self.fallbacks:
            lost = self.bytes(self.fallbacks)
            lines.append(f"WARNING: {len(self.fallbacks)} parameters fell back to replication "
                         f"({_fmt(lost[1])} per device):")
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
             ",".join(str(n) for n in r.logical) or "-", r.spec, _fmt(r.per_device),
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
            pattern, logical = param_rule(path, len(leaf.shape))
            _, why = explain_spec(logical, leaf.shape, mesh)
            total, local = _bytes(leaf)
            if pattern is None and leaf.shape:
                fallback = "no rule in PARAM_AXES matched"
            else:
                fallback = "; ".join(why) or None
            rows.append(ParamRow(path, tuple(leaf.shape), str(leaf.dtype), logical,
                                 str(getattr(leaf.sharding, "spec", "")), total, local, trainable, fallback))
    rows.sort(key=lambda r: r.path)
    opt = [_bytes(x) for x in jax.tree.leaves(opt_state) if hasattr(x, "shape") and x.dtype != object]
    return ShardingReport(dict(mesh.shape), rows, sum(t for t, _ in opt), sum(d for _, d in opt))


# --- ahead-of-time compilation with a memory check ------------------------------------------------------


def memory_needed(compiled) -> dict | None:
    """Per-device bytes of a compiled program from ``memory_analysis()`` (None where unavailable)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp",
                                                                    "generated_code")}
    # Donated inputs alias outputs: they are counted once.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def device_memory_limit(
    configured_gb: float | None = None, key: str = "train.device_memory_gb"
) -> tuple[int | None, str]:
    """(bytes one device can hold, where that number comes from): the device's own report where it
    has one (GPU, TPU), else the configured value (``key``; CPU), else None (no check)."""
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} bytes_limit"
    if configured_gb is not None:
        return int(configured_gb * GIB), key
    return None, f"no limit known (set {key} to check on this backend)"


def mesh_advice(mesh_cfg: dict, devices: int) -> str:
    """The mesh change that shards more of the state: more fsdp first, then the activation knobs."""
    fsdp, tensor = mesh_cfg.get("fsdp", 1), mesh_cfg.get("tensor", 1)
    most = devices // max(tensor, 1)
    if fsdp < most:
        return (f"shard parameters and optimizer state over more devices: raise mesh.fsdp (now {fsdp}), "
                f"e.g. --config.mesh.fsdp={most}; or cut activations with train.grad_cache=True, a smaller "
                "train.rows_per_cell or train.remat=full")
    return ("the state is already sharded over every device (mesh.fsdp = "
            f"{fsdp}): cut activations with train.grad_cache=True, a smaller train.rows_per_cell, "
            "train.remat=full, or use more devices")


class AheadOfTime:
    """A jitted function's executables by input shapes, compiled before their first call.

    ``compile`` lowers and compiles for (abstract or concrete) arguments, checks the program's
    memory against the device and keeps the executable; a call runs the executable for its
    arguments' shapes (compiling, and checking, a new shape once), so no program is compiled twice.
    ``static``: the jitted function's ``static_argnames`` (part of the key, not passed to the executable).
    """

    def __init__(self, jitted, what: str, *, mesh=None, limit: int | None = None, limit_source: str = "",
                 advice: str = "", static: tuple[str, ...] = ()):
        self.jitted, self.what, self.mesh, self.advice, self.static = jitted, what, mesh, advice, static
        self.limit, self.limit_source = limit, limit_source
        self.executables: dict = {}
        self.memory: dict = {}  # key -> memory_needed

    @staticmethod
    def _key(args):
        leaves, tree = jax.tree.flatten(args)
        return tree, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else x for x in leaves)

    def compile(self, *args, **kwargs):
        key = self._key((args, kwargs))
        if key not in self.executables:
            # Traced under the mesh, so the model's activation constraints (``mesh.constrain``) apply.
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                lowered = self.jitted.lower(*args, **kwargs)
            compiled = lowered.compile()
            need = memory_needed(compiled)
            self.memory[key] = need
            self.check(need)
            self.executables[key] = compiled
        return self.executables[key]

    def check(self, need: dict | None) -> None:
        """A program whose per-device need exceeds the limit is an error with the numbers and advice."""
        if need is not None and self.limit is not None and need["total"] > self.limit:
            raise ValueError(
                    f"the {self.what} needs {_fmt(need['total'])} per device "
                    f"(arguments {_fmt(need['argument'])}, outputs {_fmt(need['output'])}, "
                    f"temporaries {_fmt(need['temp'])}) but a device holds "
                    f"{_fmt(self.limit)} ({self.limit_source}): {self.advice}"
                )

    def __call__(self, *args, **kwargs):
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static}
        return self.compile(*args, **kwargs)(*args, **dynamic)

    def describe(self, key=None) -> str:
        need = self.memory[key] if key is not None else next(iter(self.memory.values()), None)
        if need is None:
            return f"{self.what}: compiled ahead of time (this backend reports no memory analysis)"
        limit = f" of {_fmt(self.limit)} ({self.limit_source})" if self.limit else f" ({self.limit_source})"
        return (f"{self.what}: {_fmt(need['total'])} per device{limit}: arguments {_fmt(need['argument'])}, "
                f"outputs {_fmt(need['output'])}, aliased {_fmt(need['alias'])}, "
                f"temporaries {_fmt(need['temp'])}, "
                f"code {_fmt(need['generated_code'])}")


def abstract_batch(shape, pad_id: int, sharding_for):
    """``jax.ShapeDtypeStruct`` leaves of the largest global batch ``shape`` allows (the capacity,
    as without shape buckets), with the batch shardings: built from a one-cell batch, no data."""
    from g2e_jax.train.batch import build_batch

    one = build_batch([], dataclasses.replace(shape, chunks=1, cells=1), pad_id)

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
    step.compile(run.params, run.rest, run.opt_state, batch, consts, key)
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
