"""Qwen2-VL <-> Hugging Face checkpoints: one name table, used by both ``load`` and ``save``.

The rule groups that Qwen2.5-VL shares (patch embedding, vision attention, merger, text decoder,
transformers 5 aliases) are defined here and reused by ``g2e_jax.models.qwen2_5_vl.checkpoint``.
"""

from __future__ import annotations

from g2e_jax.models.backbone import Backbone
from g2e_jax.models.qwen2_vl.hf_files import write_tiny_files
from g2e_jax.models.name_map import FLATTEN_CONV, TRANSPOSE, NameMap, Rule
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, tiny_config
from g2e_jax.models.qwen2_vl.model import Qwen2VL


def linears(hf: str, nnx: str, names, *, bias: bool = True) -> tuple[Rule, ...]:
    """torch Linears ``{hf}.{n}`` <-> ``nnx.Linear`` ``{nnx}.{n}``: weight (transposed) and bias."""
    rules = [Rule(f"{hf}.{n}.weight", f"{nnx}.{n}.kernel", TRANSPOSE) for n in names]
    return tuple(rules + [Rule(f"{hf}.{n}.bias", f"{nnx}.{n}.bias") for n in names if bias])


def norms(hf: str, nnx: str, names, *, bias: bool) -> tuple[Rule, ...]:
    """LayerNorm (``bias``) or RMSNorm weights: ``weight`` <-> ``scale``."""
    rules = [Rule(f"{hf}.{n}.weight", f"{nnx}.{n}.scale") for n in names]
    return tuple(rules + [Rule(f"{hf}.{n}.bias", f"{nnx}.{n}.bias") for n in names if bias])


BLOCK = ("visual.blocks.{i}", "visual.blocks.{i}")
PATCH_EMBED = (Rule("visual.patch_embed.proj.weight", "visual.patch_embed.kernel", FLATTEN_CONV),)
VISION_ATTENTION = linears(*BLOCK, ("attn.qkv", "attn.proj"))
MERGER_MLP = (
    Rule("visual.merger.mlp.0.weight", "visual.merger.fc1.kernel", TRANSPOSE),
    Rule("visual.merger.mlp.0.bias", "visual.merger.fc1.bias"),
    Rule("visual.merger.mlp.2.weight", "visual.merger.fc2.kernel", TRANSPOSE),
    Rule("visual.merger.mlp.2.bias", "visual.merger.fc2.bias"),
)


def text_rules(hf: str = "model", lm_head: str = "lm_head.weight", *, attention_bias: bool = True):
    """The decoder (``text.*``) under the HF prefix ``hf``; LLaVA-NeXT's Llama/Mistral decoder has no
    q/k/v biases and lives under ``language_model.model``."""
    attn = "text.layers.{i}.attn"
    return (
        Rule(f"{hf}.embed_tokens.weight", "text.embed_tokens.embedding"),
        *linears(f"{hf}.layers.{{i}}.self_attn", attn, ("q_proj", "k_proj", "v_proj"), bias=attention_bias),
        *linears(f"{hf}.layers.{{i}}.self_attn", attn, ("o_proj",), bias=False),
        *linears(
            f"{hf}.layers.{{i}}.mlp", "text.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj"), bias=False
        ),  # fmt: skip
        Rule(f"{hf}.layers.{{i}}.input_layernorm.weight", "text.layers.{i}.input_norm.scale"),
        Rule(f"{hf}.layers.{{i}}.post_attention_layernorm.weight", "text.layers.{i}.post_attn_norm.scale"),
        Rule(f"{hf}.norm.weight", "text.norm.scale"),
        Rule(lm_head, "lm_head.kernel", TRANSPOSE),
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

BACKBONE = Backbone("qwen2_vl", Qwen2VLConfig, Qwen2VL, NAME_MAP, tiny_config, write_tiny_files)
load, save = BACKBONE.load, BACKBONE.save
