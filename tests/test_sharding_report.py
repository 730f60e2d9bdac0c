"""Know before you pay: sharding report, ahead-of-time memory check, activation constraints.

The 8-device checks run in one subprocess (tests/sharding_checks.py) on abstract arrays: no weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import report, shared_results

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory, "sharding_checks", "sharding_checks.py")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["2b", "7b"])
def test_fsdp8_shards_everything_it_should(results, size):
    r = results[f"widths/{size}"]
    report(f"{size} widths, fsdp=8 (abstract)", total=r["total"], per_device=r["per_device"],
           replicated_by_rule=r["replicated_by_rule"])
    assert r["per_device"] <= r["total"] / 8 + r["replicated_by_rule"]
    assert r["fallbacks"] == []
    assert r["sharded_kernels"] == r["frozen_kernels"] > 0


@pytest.mark.slow
def test_tiny_sharding_dump_matches_golden(results):
    # tests/golden/sharding_tiny.txt; regenerate with tests/sharding_checks.py OUT --update-golden
    assert results["tiny/golden_equal"], results["tiny/text"]


@pytest.mark.slow
def test_fallbacks_are_reported_with_reasons(results):
    rows = results["fallback/rows"]
    assert rows["mystery.kernel"] == "no logical axes declared where it was made"
    assert rows["text.embed_tokens.embedding"] == "dim 1 (embed) = 36 is not divisible by fsdp = 8"
    assert "WARNING: 2 parameters fell back to replication" in results["fallback/summary"]


@pytest.mark.slow
def test_step_that_does_not_fit_is_refused_with_numbers(results):
    need = results["memory/7b_1_layer"]["need"]
    assert need["temp"] > 0 and need["argument"] > 0
    message = results["memory/too_small"]
    assert message is not None and "training step needs" in message and "per device" in message
    assert "--config.mesh.fsdp=8" in results["memory/advice_data8"]


@pytest.mark.slow
def test_per_layer_remat_keeps_depth_from_multiplying_temporaries(results):
    """fsdp=8, GradCache 2 chunks: each added (decoder layer + vision block) adds its activations to the
    step's temporaries without remat, and far less (its input, and on CPU its float32-converted
    weights) with ``train.remat=layers``."""
    temp = {k: results[f"remat/{k}"]["temp"] for k in ("none/depth1", "none/depth4", "layers/depth1",
                                                        "layers/depth4")}  # fmt: skip
    per_layer = {r: (temp[f"{r}/depth4"] - temp[f"{r}/depth1"]) / 3 for r in ("none", "layers")}
    report("temporaries per added layer + block (small width, fsdp=8)", **{f"{r}_MiB": v / 2**20 for r, v
           in per_layer.items()}, residual_MiB=results["remat/residual_bytes"] / 2**20)  # fmt: skip
    assert per_layer["none"] > 0
    assert per_layer["layers"] <= per_layer["none"] / 3


def test_ahead_of_time_compiles_once_and_checks_memory():
    """In process (one device): the executable compiled ahead of time is the one a call runs, and a
    limit below the program's need is an error naming both numbers."""
    import jax
    import jax.numpy as jnp

    from g2e_jax.aot import AheadOfTime

    traces = []

    def f(x):
        traces.append(x.shape)
        return jnp.tanh(x @ x.T).sum()

    aot = AheadOfTime(jax.jit(f), "test program")
    aot.compile(jax.ShapeDtypeStruct((64, 64), jnp.float32))
    for _ in range(3):
        aot(jnp.ones((64, 64)))
    assert traces == [(64, 64)] and len(aot.executables) == 1
    need = next(iter(aot.memory.values()))["total"]
    small = AheadOfTime(jax.jit(f), "test program", limit=need - 1, limit_source="train.device_memory_gb",
                        advice="raise mesh.fsdp")
    with pytest.raises(ValueError, match=r"test program needs .* per device .*train\.device_memory_gb\): raise mesh"):
        small.compile(jax.ShapeDtypeStruct((64, 64), jnp.float32))
