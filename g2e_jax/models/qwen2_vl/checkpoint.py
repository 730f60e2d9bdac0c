"""Qwen2-VL <-> Hugging Face checkpoints: one name table, used by both ``load`` and ``save``, from the
rule groups of ``g2e_jax.models.common.checkpoint``; and the ``BACKBONE`` entry.

The vision rule groups of the family (patch embedding, vision attention, merger, the decoder under
``model``, transformers 5 aliases) are defined here and reused by ``g2e_jax.models.qwen2_5_vl.checkpoint``.
"""

from __future__ import annotations

from g2e_jax.models.backbone import Backbone, ImageProcessing
from g2e_jax.models.common.checkpoint import linears, norms, text_rules
from g2e_jax.models.name_map import FLATTEN_CONV, TRANSPOSE, NameMap, Rule
from g2e_jax.models.qwen2_vl import images
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, tiny_config
from g2e_jax.models.qwen2_vl.hf_files import write_tiny_files
from g2e_jax.models.qwen2_vl.model import Qwen2VL
from g2e_jax.prompts import QWEN2_VL_CHAT

BLOCK = ("visual.blocks.{i}", "visual.blocks.{i}")
PATCH_EMBED = (Rule("visual.patch_embed.proj.weight", "visual.patch_embed.kernel", FLATTEN_CONV),)
VISION_ATTENTION = linears(*BLOCK, ("attn.qkv", "attn.proj"))
MERGER_MLP = (
    Rule("visual.merger.mlp.0.weight", "visual.merger.fc1.kernel", TRANSPOSE),
    Rule("visual.merger.mlp.0.bias", "visual.merger.fc1.bias"),
    Rule("visual.merger.mlp.2.weight", "visual.merger.fc2.kernel", TRANSPOSE),
    Rule("visual.merger.mlp.2.bias", "visual.merger.fc2.bias"),
)
TEXT = text_rules()
# transformers 5 in-memory names -> hub names.
ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))

NAME_MAP = NameMap(
    rules=(
        *PATCH_EMBED,
        *norms(*BLOCK, ("norm1", "norm2"), bias=True),  # LayerNorm
        *VISION_ATTENTION,
        *linears(*BLOCK, ("mlp.fc1", "mlp.fc2")),
        *norms("visual.merger", "visual.merger", ("ln_q",), bias=True),
        *MERGER_MLP,
        *TEXT,
    ),
    aliases=ALIASES,
)

IMAGES = ImageProcessing(
    lambda path, resolution: images.ImageConfig.from_preprocessor_config(path, resolution=resolution),
    images.preprocess,
    lambda grid, cfg: images.num_image_tokens(grid, cfg.vision.spatial_merge_size),
    settings=images.ImageConfig,
    store=images.preprocess_uint8,
    expand=images.expand_patches,
    stored_dim=lambda cfg: 3 * cfg.patch_size**2,
)
BACKBONE = Backbone("qwen2_vl", Qwen2VLConfig, Qwen2VL, NAME_MAP, tiny_config, write_tiny_files,
                    chat=QWEN2_VL_CHAT, images=IMAGES)  # fmt: skip
load, save = BACKBONE.load, BACKBONE.save
