"""Data-parallel encoding on 8 simulated CPU devices equals 1 device (1e-6, float32), with the weights
replicated and sharded (fsdp); the sharded exact search equals the single-device one exactly.

The checks run in one subprocess (the device count is fixed when JAX starts): tests/encode_mesh_checks.py.
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


@pytest.fixture(scope="module")
def results(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "results.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(HERE / "encode_mesh_checks.py"), str(tiny_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=HERE.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["data", "fsdp"])
def test_8_devices_encode_like_1(results, weights):
    report(f"8-device encode ({weights}) vs 1 device", query=results[f"{weights}/query"],
           document=results[f"{weights}/document"], programs=results["programs"][weights])  # fmt: skip
    assert results["cells"] == [1, 8, 8]  # one cell per device of the data axes
    assert results[f"{weights}/query"] <= 1e-6 and results[f"{weights}/document"] <= 1e-6
    assert results["programs"][weights] <= results["programs"]["one"]  # sharding adds no programs
    if weights == "fsdp":
        assert results["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and results["fsdp_sharded_params"] > 0


@pytest.mark.slow
def test_sharded_exact_search_equals_one_device(results):
    r = results["nearest"]
    assert r["same_index"] and r["score_diff"] == 0.0 and r["equals_brute_force"]
