"""The tiny random Qwen2-VL (the embedded default of the demo and the tests): 2 vision blocks,
2 decoder layers, grouped-query attention, M-RoPE sections and a 2x2 spatial merge.
``g2e_jax.models.tiny`` holds the machinery every backbone's tiny model shares."""

from __future__ import annotations

from pathlib import Path

from g2e_jax.models import tiny
from g2e_jax.models.qwen2_vl.checkpoint import BACKBONE
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, tiny_config, with_token_ids
from g2e_jax.models.qwen2_vl.model import Qwen2VL

__all__ = ["make_tiny", "random_model", "tiny_config", "with_token_ids"]


def random_model(cfg: Qwen2VLConfig, seed: int = 0) -> Qwen2VL:
    return tiny.random_model(BACKBONE, cfg, seed)


def make_tiny(output: str | Path, *, seed: int = 0, config: Qwen2VLConfig | None = None) -> Path:
    return tiny.make_tiny(BACKBONE, output, seed=seed, config=config)
