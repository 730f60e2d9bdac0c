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
from g2e_jax.models.common.layers import stack_paths


def random_model(backbone: Backbone, cfg, seed: int = 0):
    """A model with numpy-drawn weights: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2). Drawn tensor by tensor in the order of the
    per-layer names (each layer of a stack on its own), so the weights are those of the layout
    before layers were stacked."""
    rng = np.random.default_rng(seed)
    abstract = backbone.abstract_model(cfg)
    stacks = stack_paths(abstract)
    graphdef, state = nnx.split(abstract)
    tensors = []  # (per-layer path, variable, layer or None)
    for path, variable in nnx.to_flat_state(state):
        stack = next((s for s in stacks if tuple(path[: len(s)]) == s), None)
        if stack is None:
            tensors.append((tuple(path), variable, None))
        else:
            n = len(stack)
            tensors += [(tuple(path[:n]) + (i,) + tuple(path[n:]), variable, i)
                        for i in range(variable.get_value().shape[0])]  # fmt: skip
    values = {}
    for path, variable, layer in sorted(tensors, key=lambda t: tuple((isinstance(k, str), k) for k in t[0])):
        shape = tuple(variable.get_value().shape)[0 if layer is None else 1 :]
        leaf = str(path[-1])
        if leaf == "kernel":
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])
        elif leaf == "embedding":
            value = rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            value = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        values.setdefault(id(variable), (variable, {}))[1][layer] = value
    for variable, layers in values.values():
        value = layers[None] if None in layers else np.stack([layers[i] for i in range(len(layers))])
        variable.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


def make_tiny(backbone: Backbone, output: str | Path, *, seed: int = 0, config=None) -> Path:
    """Writes config.json, model.safetensors, tokenizer, chat template and preprocessor config."""
    output = Path(output)
    cfg = config if config is not None else backbone.tiny_config()
    backbone.save(random_model(backbone, cfg, seed), output, progress=False)
    backbone.tiny_files(output, cfg)
    return output
