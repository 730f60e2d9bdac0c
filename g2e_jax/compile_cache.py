"""JAX's persistent compilation cache, on by default for every ``g2e-jax`` command.

A training step, an encode program or an eval program is compiled once per machine and read back
by every later start, resume or rerun of the same program (the key covers the program, its shapes
and shardings, the jax/XLA version and the flags), instead of paying the compile again: seconds on
the tiny model, minutes at 7B on a pod.

Where: ``$G2E_JAX_COMPILE_CACHE`` (a folder; ``off`` disables it), else JAX's own
``JAX_COMPILATION_CACHE_DIR`` when the user set it, else ``$XDG_CACHE_HOME/g2e_jax/xla`` (default
``~/.cache/g2e_jax/xla``). Bounded: least recently used programs are evicted past
``$G2E_JAX_COMPILE_CACHE_GB`` (default 8) GiB.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "G2E_JAX_COMPILE_CACHE"
SIZE_ENV = "G2E_JAX_COMPILE_CACHE_GB"
OFF = ("off", "none", "0", "false")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "g2e_jax" / "xla"


def enable_compile_cache() -> Path | None:
    """Points JAX at the cache folder (see the module docstring); returns it, or None when off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = Path(setting) if setting else None
    if folder is None and jax.config.jax_compilation_cache_dir:  # the user's own JAX setting wins
        return Path(jax.config.jax_compilation_cache_dir)
    folder = (folder or default_dir()).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"the compilation cache folder {folder} cannot be created ({e}); set {ENV} to a "
                      f"writable folder, or {ENV}=off") from e  # fmt: skip
    try:
        gib = float(os.environ.get(SIZE_ENV, "8"))
    except ValueError as e:
        raise ValueError(f"{SIZE_ENV}={os.environ[SIZE_ENV]!r} is not a number of GiB") from e
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", int(gib * 2**30))
    return folder


class CompileClock:
    """Programs XLA compiled since this clock started, programs read back from the persistent cache
    instead, and the seconds all of it took (tracing, lowering, and XLA's compile or the cache read),
    from JAX's own monitoring events: a run's step times can then be told apart from its compiles (a
    new shape bucket is traced, lowered and compiled mid-run; at the tiny model's widths tracing and
    lowering alone take about 2 s of each program)."""

    BACKEND = "/jax/core/compile/backend_compile_duration"  # a compile or a cache read
    STAGES = (BACKEND, "/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration")  # fmt: skip
    HIT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.events, self.hits, self.seconds = 0, 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    @property
    def count(self) -> int:
        """Programs compiled (not read from the cache)."""
        return self.events - self.hits

    def _duration(self, event: str, duration: float, **kwargs) -> None:
        if event not in self.STAGES:
            return
        # A jit called inside another's trace is traced inline: no event of its own, so no second
        # is counted twice (tests/test_compile_cache.py).
        self.events += event == self.BACKEND
        self.seconds += duration

    def _event(self, event: str, **kwargs) -> None:
        if event == self.HIT:
            self.hits += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)
