"""Compile before the first call, and know what the program needs: ``AheadOfTime`` lowers and
compiles a jitted function for its arguments' shapes, reads ``memory_analysis()`` and refuses a program
that cannot fit a device, naming what it needs; its executables are the ones the calls then run.

Used by training (``g2e_jax.train.report``) and by every encode (``g2e_jax.embed``), so it imports
nothing from either.
"""

from __future__ import annotations

import contextlib
import os

import jax

GIB = 1 << 30


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


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


def host_memory_bytes() -> int | None:
    """This machine's memory for one process: the smaller of physical memory and the cgroup's
    limit (a container's), or None where neither can be read."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < (1 << 60):  # "max" or a huge number: no limit
            sizes.append(int(value))
    return min(sizes) if sizes else None


def device_memory_limit(
    configured_gb: float | None = None, key: str = "train.device_memory_gb", *, host_default: bool = False
) -> tuple[int | None, str]:
    """(bytes one device can hold, where that number comes from): the device's own report where it
    has one (GPU, TPU), else the configured value (``key``; CPU), else with ``host_default`` the
    host's memory (a CPU device's memory is the host's), else None (no check)."""
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind} bytes_limit"
    if configured_gb is not None:
        return int(configured_gb * GIB), key
    host = host_memory_bytes() if host_default and jax.default_backend() == "cpu" else None
    if host is not None:
        return host, f"this host's memory; set {key} to change"
    return None, f"no limit known (set {key} to check on this backend)"


class ProgramTooLarge(ValueError):
    """A compiled program whose per-device need exceeds the limit (``need``: ``memory_needed``)."""

    def __init__(self, message: str, need: dict, limit: int):
        super().__init__(message)
        self.need, self.limit = need, limit


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
        # dtype objects, not their names: str(dtype) was a third of this key's cost on every call.
        return tree, tuple((tuple(x.shape), x.dtype) if hasattr(x, "shape") else x for x in leaves)

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
            raise ProgramTooLarge(
                    f"the {self.what} needs {fmt_bytes(need['total'])} per device "
                    f"(arguments {fmt_bytes(need['argument'])}, outputs {fmt_bytes(need['output'])}, "
                    f"temporaries {fmt_bytes(need['temp'])}) but a device holds "
                    f"{fmt_bytes(self.limit)} ({self.limit_source}): {self.advice}",
                    need,
                    self.limit,
                )

    def __call__(self, *args, **kwargs):
        dynamic = {k: v for k, v in kwargs.items() if k not in self.static}
        return self.compile(*args, **kwargs)(*args, **dynamic)

    def describe(self, key=None) -> str:
        need = self.memory[key] if key is not None else next(iter(self.memory.values()), None)
        if need is None:
            return f"{self.what}: compiled ahead of time (this backend reports no memory analysis)"
        limit = f" of {fmt_bytes(self.limit)} ({self.limit_source})" if self.limit else f" ({self.limit_source})"
        return (f"{self.what}: {fmt_bytes(need['total'])} per device{limit}: arguments {fmt_bytes(need['argument'])}, "
                f"outputs {fmt_bytes(need['output'])}, aliased {fmt_bytes(need['alias'])}, "
                f"temporaries {fmt_bytes(need['temp'])}, "
                f"code {fmt_bytes(need['generated_code'])}")
