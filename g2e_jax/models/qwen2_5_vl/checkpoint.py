"""Qwen2.5-VL <-> Hugging Face checkpoints: its family's (Qwen2-VL's) rule groups, with RMSNorm (no bias)
in the vision blocks and the merger, and the vision blocks' SwiGLU MLP (with bias); Qwen2-VL's tiny
files, chat format and image processor, which Qwen2.5-VL uses unchanged."""

from __future__ import annotations

from g2e_jax.models.backbone import Backbone
from g2e_jax.models.common.checkpoint import linears, norms
from g2e_jax.models.name_map import NameMap
from g2e_jax.models.qwen2_5_vl.config import Qwen2_5VLConfig, tiny_config
from g2e_jax.models.qwen2_5_vl.model import Qwen2_5VL
from g2e_jax.models.qwen2_vl.checkpoint import (
    ALIASES,
    BLOCK,
    IMAGES,
    MERGER_MLP,
    PATCH_EMBED,
    TEXT,
    VISION_ATTENTION,
)
from g2e_jax.models.qwen2_vl.hf_files import write_tiny_files
from g2e_jax.prompts import QWEN2_VL_CHAT

NAME_MAP = NameMap(
    rules=(
        *PATCH_EMBED,
        *norms(*BLOCK, ("norm1", "norm2"), bias=False),  # RMSNorm
        *VISION_ATTENTION,
        *linears(*BLOCK, ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        *norms("visual.merger", "visual.merger", ("ln_q",), bias=False),
        *MERGER_MLP,
        *TEXT,
    ),
    aliases=ALIASES,
)

BACKBONE = Backbone("qwen2_5_vl", Qwen2_5VLConfig, Qwen2_5VL, NAME_MAP, tiny_config, write_tiny_files,
                    chat=QWEN2_VL_CHAT, images=IMAGES)  # fmt: skip
load, save = BACKBONE.load, BACKBONE.save
