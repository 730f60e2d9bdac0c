"""Checkpoint name-map rule groups every backbone builds its ``NameMap`` from: torch Linears, norms, and
the text decoder's rules under any Hugging Face prefix."""

from __future__ import annotations

from g2e_jax.models.name_map import TRANSPOSE, Rule


def linears(hf: str, nnx: str, names, *, bias: bool = True) -> tuple[Rule, ...]:
    """torch Linears ``{hf}.{n}`` <-> ``nnx.Linear`` ``{nnx}.{n}``: weight (transposed) and bias. A name
    may be a pair ``(hf_name, nnx_name)`` where the two differ."""
    pairs = [(n, n) if isinstance(n, str) else tuple(n) for n in names]
    rules = [Rule(f"{hf}.{h}.weight", f"{nnx}.{n}.kernel", TRANSPOSE) for h, n in pairs]
    return tuple(rules + [Rule(f"{hf}.{h}.bias", f"{nnx}.{n}.bias") for h, n in pairs if bias])


def norms(hf: str, nnx: str, names, *, bias: bool) -> tuple[Rule, ...]:
    """LayerNorm (``bias``) or RMSNorm weights: ``weight`` <-> ``scale``; names as ``linears``'."""
    pairs = [(n, n) if isinstance(n, str) else tuple(n) for n in names]
    rules = [Rule(f"{hf}.{h}.weight", f"{nnx}.{n}.scale") for h, n in pairs]
    return tuple(rules + [Rule(f"{hf}.{h}.bias", f"{nnx}.{n}.bias") for h, n in pairs if bias])


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
