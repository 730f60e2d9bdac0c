"""Precision by name. ``auto`` is bf16 weights and activations on accelerators (matmuls at full
rate; softmax and norms stay float32 inside the model) and float32 on CPU, where bf16 is slower."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(name: str | None, *, on_cpu: str | None = "float32") -> str | None:
    """``auto`` -> bfloat16 on accelerators, ``on_cpu`` on CPU; other names are checked; None stays None."""
    if name == "auto":
        return on_cpu if jax.default_backend() == "cpu" else "bfloat16"
    if name is not None and name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected 'auto' or one of {sorted(DTYPES)}")
    return name
