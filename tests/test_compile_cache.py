"""Where the persistent compilation cache goes (``G2E_JAX_COMPILE_CACHE``, JAX's own setting, the
user cache folder), that it can be turned off, and that a program built twice compiles once."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest

from g2e_jax import compile_cache
from g2e_jax.compile_cache import CompileClock, enable_compile_cache

SETTINGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_compilation_cache_max_size")


@pytest.fixture
def restore_jax_settings():
    saved = {name: getattr(jax.config, name) for name in SETTINGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_folder_comes_from_the_variable_then_jax_then_the_user_cache(tmp_path, monkeypatch,
                                                                         restore_jax_settings):  # fmt: skip
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    monkeypatch.setenv(compile_cache.SIZE_ENV, "0.5")
    assert enable_compile_cache() == tmp_path / "mine"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
    assert jax.config.jax_compilation_cache_max_size == 2**29

    monkeypatch.delenv(compile_cache.ENV)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))  # JAX_COMPILATION_CACHE_DIR
    assert enable_compile_cache() == tmp_path / "theirs"

    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
    assert enable_compile_cache() == tmp_path / "home_cache" / "g2e_jax" / "xla"


def test_off_turns_it_off_and_bad_settings_name_the_variable(tmp_path, monkeypatch, restore_jax_settings):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert enable_compile_cache() is None and not jax.config.jax_enable_compilation_cache
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    monkeypatch.setenv(compile_cache.SIZE_ENV, "lots")
    with pytest.raises(ValueError, match="G2E_JAX_COMPILE_CACHE_GB='lots' is not a number"):
        enable_compile_cache()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "cache"))
    with pytest.raises(OSError, match="cannot be created.*G2E_JAX_COMPILE_CACHE=off"):
        enable_compile_cache()


def test_the_clock_counts_compiles_with_their_tracing():
    """The clock's seconds hold the trace (here slowed by a sleep) and XLA's compile, nested jits
    once: never more than the first call's wall time."""

    def slow_to_trace(x):
        time.sleep(0.5)  # runs while tracing only
        inner = [jax.jit(lambda y, i=i: jnp.sin(y) + i) for i in range(20)]
        for f in inner:
            x = f(x)
        return x * 3.0 + 1.5

    clock = CompileClock()
    try:
        start = time.perf_counter()
        jax.jit(slow_to_trace)(jnp.arange(7.0)).block_until_ready()
        wall = time.perf_counter() - start
        assert clock.count >= 1 and 0.5 <= clock.seconds <= wall
    finally:
        clock.close()
    count = clock.count
    jax.jit(lambda x: jnp.cos(x) * 2.0)(jnp.arange(5.0)).block_until_ready()
    assert clock.count == count  # closed: no longer listening


def test_a_program_read_back_from_the_cache_is_not_counted_as_compiled(tmp_path, restore_jax_settings):
    """A new function object with the same program, after the in-memory caches are cleared: the
    persistent cache serves it, and the clock sees a read, not a compile."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    try:
        x = jnp.ones((9, 9))
        clock = CompileClock()
        jax.jit(lambda x: jnp.tanh(x @ x.T) * 0.25)(x).block_until_ready()
        first = (clock.count, clock.hits)
        jax.clear_caches()
        jax.jit(lambda x: jnp.tanh(x @ x.T) * 0.25)(x).block_until_ready()
        clock.close()
        assert first == (1, 0)
        assert (clock.count, clock.hits) == (1, 1)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        cc.reset_cache()
