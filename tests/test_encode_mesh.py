"""Data-parallel encoding on 8 simulated CPU devices equals 1 device (1e-6, float32), with the weights
replicated and sharded (fsdp); the sharded exact search equals the single-device one exactly.

The checks run in one subprocess (the device count is fixed when JAX starts): tests/encode_mesh_checks.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import report, shared_results

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tiny_dir, tmp_path_factory):
    return shared_results(tmp_path_factory, "encode_mesh_checks", "encode_mesh_checks.py", str(tiny_dir))


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
