"""Sharded loss and training step on 8 simulated CPU devices equal the single-device ones.

The checks run in one subprocess (the device count is fixed when JAX starts), see
tests/multidevice_checks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import report

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow  # 8 devices in a subprocess: `pytest -m "not slow"` leaves it out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "results.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(HERE / "multidevice_checks.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=HERE.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


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
