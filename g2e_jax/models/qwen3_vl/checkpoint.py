"""Qwen3-VL <-> Hugging Face checkpoints, and the ``BACKBONE`` entry: its family's (Qwen2-VL's) rule groups
(patch embedding, vision attention, LayerNorm blocks, the transformers 5 aliases) with Qwen3-VL's names:
a patch-embedding bias, ``mlp.linear_fc1/2``, the learned ``pos_embed``, the merger's ``norm`` and
``linear_fc1/2``, the DeepStack mergers (``deepstack_merger_list.{i}``, a stack here), and the decoder
without q/k/v biases but with ``q_norm``/``k_norm``. Hub checkpoints are saved as transformers 5 writes
them (``model.language_model.*``, ``model.visual.*``; ``lm_head.weight`` only when untied).
Qwen2-VL's image processor with the checkpoint's patch size and its chat format are used unchanged.
"""

from __future__ import annotations

from g2e_jax.models.backbone import Backbone
from g2e_jax.models.common.checkpoint import linears, norms, text_rules
from g2e_jax.models.name_map import NameMap, Rule
from g2e_jax.models.qwen2_vl.checkpoint import IMAGES, PATCH_EMBED, VISION_ATTENTION
from g2e_jax.models.qwen3_vl.config import Qwen3VLConfig, tiny_config
from g2e_jax.models.qwen3_vl.hf_files import write_tiny_files
from g2e_jax.models.qwen3_vl.model import Qwen3VL
from g2e_jax.prompts import QWEN2_VL_CHAT

BLOCK = ("model.visual.blocks.{i}", "visual.blocks.{i}")


def under_model(rules) -> tuple[Rule, ...]:
    """Qwen2-VL's hub rules (``visual.*``) under transformers 5's ``model.`` prefix, as Qwen3-VL stores them."""
    return tuple(Rule("model." + r.hf, r.nnx, r.transform) for r in rules)


def merger_rules(hf: str, nnx: str) -> tuple[Rule, ...]:
    """A Qwen3-VL merger: ``norm`` (LayerNorm), ``linear_fc1``, ``linear_fc2`` <-> ``ln_q``, ``fc1``, ``fc2``."""
    return (*norms(hf, nnx, (("norm", "ln_q"),), bias=True),
            *linears(hf, nnx, (("linear_fc1", "fc1"), ("linear_fc2", "fc2"))))  # fmt: skip


TEXT = text_rules("model.language_model", attention_bias=False) + norms(
    "model.language_model.layers.{i}.self_attn", "text.layers.{i}.attn", ("q_norm", "k_norm"), bias=False
)

NAME_MAP = NameMap(
    rules=(
        *under_model(PATCH_EMBED),
        Rule("model.visual.patch_embed.proj.bias", "visual.patch_embed.bias"),
        Rule("model.visual.pos_embed.weight", "visual.pos_embed.embedding"),
        *norms(*BLOCK, ("norm1", "norm2"), bias=True),  # LayerNorm
        *under_model(VISION_ATTENTION),
        *linears(*BLOCK, (("mlp.linear_fc1", "mlp.fc1"), ("mlp.linear_fc2", "mlp.fc2"))),
        *merger_rules("model.visual.merger", "visual.merger"),
        *merger_rules("model.visual.deepstack_merger_list.{i}", "visual.deepstack_mergers.{i}"),
        *TEXT,
    ),
)

BACKBONE = Backbone("qwen3_vl", Qwen3VLConfig, Qwen3VL, NAME_MAP, tiny_config, write_tiny_files,
                    chat=QWEN2_VL_CHAT, images=IMAGES)  # fmt: skip
load, save = BACKBONE.load, BACKBONE.save
