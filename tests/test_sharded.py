"""Sharded loss and training step on 8 simulated CPU devices equal the single-device ones.

The checks run in one subprocess (the device count is fixed when JAX starts), see
tests/multidevice_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import report, shared_results

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow  # 8 devices in a subprocess: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory, "multidevice_checks", "multidevice_checks.py")


@pytest.mark.parametrize("variant", ["filters off", "target ids", "all filters"])
def test_sharded_loss_equals_single_device(results, variant):
    r = results[f"loss/{variant}"]
    report(f"8-device loss ({variant})", **r)
    assert r["shard_map_loss_diff"] <= 1e-6 and r["gspmd_loss_diff"] <= 1e-6
    assert r["shard_map_grad_diff"] <= 1e-6 and r["gspmd_grad_diff"] <= 1e-6
    assert r["metrics_diff"] <= 1e-5
    assert r["devices_with_grad"] == r["devices"] == 8
    if variant == "all filters":
        assert r["masked"] > 0


@pytest.mark.parametrize("grad_cache", [False, True])
def test_sharded_training_step_equals_single_device(results, grad_cache):
    r = results[f"step/grad_cache={grad_cache}"]
    report(f"8-device training step (data 2 x fsdp 2 x tensor 2, GradCache {grad_cache})", **r)
    assert r["sharded_params"] > 0
    assert r["loss_diff"] <= 1e-5
    assert r["grad_relative_l2"] <= 1e-5


def test_activation_constraints_change_nothing_but_layout(results):
    """The GradCache case above ran sharded under ``jax.set_mesh`` (the activation sharding constraints
    active, as in the trainer) and equals the single device, whose program has none."""
    assert results["constraints"]["no mesh"] == 0
    assert results["constraints"]["mesh"] > 0
    r = results["step/grad_cache=True"]
    assert r["loss_diff"] <= 1e-5 and r["grad_relative_l2"] <= 1e-5
