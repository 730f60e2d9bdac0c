"""Shared fixtures: the tiny model written once per session, loaded by both frameworks."""

from __future__ import annotations

import importlib
import os

import jax
import numpy as np
import pytest

# Parity is judged in float32 at full matmul precision (DESIGN.md §3).
jax.config.update("jax_default_matmul_precision", "highest")


# The PyTorch side of the parity tests. Locally they skip without it; under CI (env CI set) a missing
# reference is an error, so that ~40 parity tests cannot turn into skips and a green run.
REFERENCE_PACKAGES = ("torch", "transformers", "peft")


def pytest_sessionstart(session):
    if not os.environ.get("CI"):
        return
    missing = []
    for name in REFERENCE_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    if missing:
        pytest.exit(
            f"CI is set but the PyTorch reference cannot be imported: {', '.join(missing)}; "
            "the parity tests would all be skipped",
            returncode=3,
        )


def report(case: str, **values) -> None:
    """One greppable line per measured quantity (visible with ``pytest -s``)."""
    items = " ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\n[parity] {case}: {items}")


def real_token_diff(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Max abs difference over the real (attention_mask == 1) positions of ``[B, L, H]`` states."""
    mask = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ref)[mask] - np.asarray(out)[mask]).max())


def pooled_cosine(ref: np.ndarray, out: np.ndarray, mask: np.ndarray) -> float:
    """Minimum cosine between the two models' last-real-token states (the embedding we pool)."""
    mask = np.asarray(mask).astype(bool)
    last = np.array([np.flatnonzero(row)[-1] for row in mask])
    a = np.asarray(ref)[np.arange(len(last)), last]
    b = np.asarray(out)[np.arange(len(last)), last]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.min())


def assert_parity(case: str, ref: np.ndarray, out: np.ndarray, mask: np.ndarray, **extra) -> None:
    """Reports, then checks final hidden states against the reference's: max abs difference over real
    tokens <= 1e-4 and pooled cosine >= 0.99999 (DESIGN.md §3)."""
    diff = real_token_diff(ref, out, mask)
    cosine = pooled_cosine(ref, out, mask)
    report(case, max_abs_diff=diff, pooled_one_minus_cosine=1.0 - cosine, ref_max_abs=float(np.abs(ref).max()),
           **extra)  # fmt: skip
    assert np.shape(out) == np.shape(ref)
    assert diff <= 1e-4
    assert cosine >= 0.99999


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from g2e_jax.models.qwen2_vl.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def jax_model(tiny_dir):
    from g2e_jax.models.qwen2_vl import load

    return load(tiny_dir, progress=False)
