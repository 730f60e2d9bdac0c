"""Tiny random models in Hugging Face layout: the embedded default of the demo and the tests.

Small enough for a fast forward pass on 2 CPU cores, but with the real architecture (each backbone's
``tiny_config``). Weights come from numpy (no torch needed) with unit-scale activations, so parity
tests are sensitive to every layer.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.models.backbone import Backbone


def random_model(backbone: Backbone, cfg, seed: int = 0):
    """A model with numpy-drawn weights: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(backbone.abstract_model(cfg))
    for path, variable in nnx.to_flat_state(state):
        shape, leaf = tuple(variable.get_value().shape), str(path[-1])
        if leaf == "kernel":
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])
        elif leaf == "embedding":
            value = rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            value = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        variable.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


def make_tiny(backbone: Backbone, output: str | Path, *, seed: int = 0, config=None) -> Path:
    """Writes config.json, model.safetensors, tokenizer, chat template and preprocessor config."""
    output = Path(output)
    cfg = config if config is not None else backbone.tiny_config()
    backbone.save(random_model(backbone, cfg, seed), output, progress=False)
    backbone.tiny_files(output, cfg)
    return output
