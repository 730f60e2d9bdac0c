"""A tiny random Qwen2-VL in Hugging Face layout: the embedded default of the demo and the tests.

Small enough for a fast forward pass on 2 CPU cores, but with the real architecture: 2 vision
blocks, 2 decoder layers, grouped-query attention, M-RoPE sections and a 2x2 spatial merge.
Weights come from numpy (no torch needed) with unit-scale activations, so parity tests are
sensitive to every layer.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2e_jax.models.qwen2_vl.checkpoint import abstract_model, save
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from g2e_jax.models.qwen2_vl.hf_files import special_token_ids, write_processor_files
from g2e_jax.models.qwen2_vl.model import Qwen2VL


def tiny_config(**text_overrides) -> Qwen2VLConfig:
    ids = special_token_ids()
    text = TextConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        rope_theta=1e6,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=ids["im_end"],
    )
    text = text.__class__(**{**text.__dict__, **text_overrides})
    vision = VisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, out_hidden_size=text.hidden_size)
    return with_token_ids(Qwen2VLConfig(text=text, vision=vision, tie_word_embeddings=True))


def with_token_ids(cfg: Qwen2VLConfig) -> Qwen2VLConfig:
    """The config with the special-token ids of the shipped tiny tokenizer."""
    ids = special_token_ids()
    return cfg.replace(
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )


def random_model(cfg: Qwen2VLConfig, seed: int = 0) -> Qwen2VL:
    """A model with numpy-drawn weights: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
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


def make_tiny(output: str | Path, *, seed: int = 0, config: Qwen2VLConfig | None = None) -> Path:
    """Writes config.json, model.safetensors, tokenizer, chat template and preprocessor config."""
    output = Path(output)
    cfg = config if config is not None else tiny_config()
    vocab = special_token_ids()["vocab_size"]
    if cfg.text.vocab_size < vocab:
        raise ValueError(f"vocab_size {cfg.text.vocab_size} is smaller than the tiny tokenizer's {vocab}")
    save(random_model(cfg, seed), output, progress=False)
    write_processor_files(
        output,
        patch_size=cfg.vision.patch_size,
        temporal_patch_size=cfg.vision.temporal_patch_size,
        merge_size=cfg.vision.spatial_merge_size,
    )
    return output
