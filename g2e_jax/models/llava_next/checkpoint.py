"""LLaVA-NeXT <-> Hugging Face checkpoints: the CLIP tower, the projector, ``image_newline``, and
the common decoder rules under ``language_model.model`` without q/k/v biases.

Canonical names are those transformers 5 writes (``vision_tower.embeddings...``,
``language_model.model.layers...``); the llava-hf hub's ``vision_tower.vision_model.*`` and transformers
5's in-memory ``model.*`` names are aliases.
"""

from __future__ import annotations

from g2e_jax.models.backbone import Backbone, ImageProcessing
from g2e_jax.models.common.checkpoint import linears, norms, text_rules
from g2e_jax.models.llava_next import anyres, images
from g2e_jax.models.llava_next.chat import LLAVA_NEXT_CHAT
from g2e_jax.models.llava_next.config import LlavaNextConfig, tiny_config
from g2e_jax.models.llava_next.hf_files import write_processor_files
from g2e_jax.models.llava_next.model import LlavaNext
from g2e_jax.models.name_map import FLATTEN_CONV, NameMap, Rule

LAYER = ("vision_tower.encoder.layers.{i}", "vision_tower.layers.{i}")

NAME_MAP = NameMap(
    rules=(
        Rule(
            "vision_tower.embeddings.patch_embedding.weight",
            "vision_tower.embeddings.patch_embedding.kernel",
            FLATTEN_CONV,
        ),
        Rule("vision_tower.embeddings.class_embedding", "vision_tower.embeddings.class_embedding"),
        Rule(
            "vision_tower.embeddings.position_embedding.weight",
            "vision_tower.embeddings.position_embedding.embedding",
        ),
        *norms("vision_tower", "vision_tower", ("pre_layrnorm", "post_layernorm"), bias=True),
        *linears(*LAYER, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")),
        *norms(*LAYER, ("layer_norm1", "layer_norm2"), bias=True),
        *linears(*LAYER, ("mlp.fc1", "mlp.fc2")),
        *linears("multi_modal_projector", "multi_modal_projector", ("linear_1", "linear_2")),
        Rule("image_newline", "image_newline"),
        *text_rules("language_model.model", "language_model.lm_head.weight", attention_bias=False),
    ),
    # transformers 5 in-memory names first (PEFT adapters are written with the first alias of a
    # canonical prefix), then the llava-hf hub's vision_model level.
    aliases=(
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("vision_tower.vision_model.", "vision_tower."),
    ),
)

IMAGES = ImageProcessing(
    lambda path, resolution: images.LlavaImageConfig.from_preprocessor_config(path, resolution=resolution),
    images.preprocess_rows,
    anyres.num_image_tokens,
    settings=images.LlavaImageConfig,
    store=images.store_rows,
    expand=images.expand_rows,
    stored_dim=lambda cfg: 3 * cfg.tile_size**2,
)
BACKBONE = Backbone(
    "llava_next",
    LlavaNextConfig,
    LlavaNext,
    NAME_MAP,
    tiny_config,
    write_processor_files,
    chat=LLAVA_NEXT_CHAT,
    images=IMAGES,
)
load, save = BACKBONE.load, BACKBONE.save
