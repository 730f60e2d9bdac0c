"""Qwen3-VL hyper-parameters: its family's (Qwen2-VL's) config (token ids, tie, config.json I/O) with
Qwen3-VL's vision tower (learned position table, LayerNorm + GELU-tanh MLP, DeepStack taps) and its
decoder's differences (q/k norms, no q/k/v bias, an explicit head_dim, interleaved M-RoPE), read from
and written to transformers' ``Qwen3VLConfig`` layout (``text_config`` / ``vision_config`` nested).

Defaults are Qwen3-VL-2B-Instruct's (``QWEN3_VL_2B``); ``QWEN3_VL_8B`` is the 8B model (its
config.json: no tied head).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from g2e_jax.models.common.config import TextConfig, pick, tiny_text_config
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, VisionSizes, with_token_ids

# transformers' Qwen3VLTextRotaryEmbedding default when rope_parameters has no mrope_section.
DEFAULT_MROPE_SECTION = (24, 20, 20)


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig(VisionSizes):
    depth: int = 24
    embed_dim: int = 1024  # HF: vision_config.hidden_size
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304  # a square table (48 x 48), interpolated to each image's grid
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    rope_theta: float = 10000.0
    out_hidden_size: int = 2048

    def __post_init__(self):
        object.__setattr__(self, "deepstack_visual_indexes", tuple(int(i) for i in self.deepstack_visual_indexes))
        side = math.isqrt(self.num_position_embeddings)
        if side < 2 or side * side != self.num_position_embeddings:
            raise ValueError(
                f"vision_config.num_position_embeddings {self.num_position_embeddings} must be a square (side >= 2)"
            )
        taps = self.deepstack_visual_indexes
        if list(taps) != sorted(set(taps)) or any(not 0 <= i < self.depth for i in taps):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes {list(taps)} must be increasing block indexes below "
                f"depth {self.depth}"
            )

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def position_side(self) -> int:
        """Side of the learned position table (transformers' ``num_grid_per_side``)."""
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_hf_dict(cls, vd: dict[str, Any], text_hidden_size: int) -> "Qwen3VisionConfig":
        d, rope = cls(), dict(vd.get("rope_parameters") or {})
        return cls(
            depth=int(pick(vd, "depth", d.depth)),
            embed_dim=int(pick(vd, "hidden_size", d.embed_dim)),
            num_heads=int(pick(vd, "num_heads", d.num_heads)),
            intermediate_size=int(pick(vd, "intermediate_size", d.intermediate_size)),
            hidden_act=str(pick(vd, "hidden_act", d.hidden_act)),
            in_channels=int(pick(vd, "in_channels", d.in_channels)),
            patch_size=int(pick(vd, "patch_size", d.patch_size)),
            temporal_patch_size=int(pick(vd, "temporal_patch_size", d.temporal_patch_size)),
            spatial_merge_size=int(pick(vd, "spatial_merge_size", d.spatial_merge_size)),
            num_position_embeddings=int(pick(vd, "num_position_embeddings", d.num_position_embeddings)),
            deepstack_visual_indexes=tuple(pick(vd, "deepstack_visual_indexes", d.deepstack_visual_indexes)),
            rope_theta=float(pick(rope, "rope_theta", d.rope_theta)),
            out_hidden_size=int(pick(vd, "out_hidden_size", text_hidden_size)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "qwen3_vl_vision",
            "depth": self.depth,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "hidden_act": self.hidden_act,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "num_position_embeddings": self.num_position_embeddings,
            "deepstack_visual_indexes": list(self.deepstack_visual_indexes),
            "out_hidden_size": self.out_hidden_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }


def qwen3_text(text: TextConfig, **fields) -> TextConfig:
    """A decoder config with Qwen3-VL's fixed choices: q/k norms, interleaved M-RoPE, and head_dim
    explicit (config.json always names it, so a config read back equals the one written)."""
    text = dataclasses.replace(text, qk_norm=True, mrope_interleaved=True, **fields)
    return dataclasses.replace(text, attention_head_dim=text.head_dim)


def _text_2b() -> TextConfig:
    return qwen3_text(TextConfig(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, rope_theta=5e6, mrope_section=DEFAULT_MROPE_SECTION,
        max_position_embeddings=262144, attention_bias=False,
    ), attention_head_dim=128)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(Qwen2VLConfig):
    text: TextConfig = dataclasses.field(default_factory=_text_2b)
    vision: Qwen3VisionConfig = dataclasses.field(default_factory=Qwen3VisionConfig)
    model_type: str = "qwen3_vl"

    vision_class: ClassVar[type] = Qwen3VisionConfig
    architecture: ClassVar[str] = "Qwen3VLForConditionalGeneration"

    def __post_init__(self):
        super().__post_init__()
        if not (self.text.qk_norm and self.text.mrope_interleaved) or self.text.attention_bias:
            raise ValueError(
                "a Qwen3-VL decoder has q/k norms, interleaved M-RoPE and no q/k/v bias (build its text config "
                "with g2e_jax.models.qwen3_vl.config.qwen3_text)"
            )

    @classmethod
    def text_from_hf_dict(cls, d: dict[str, Any]) -> TextConfig:
        text = dict(d.get("text_config") or d)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        base = TextConfig.from_hf_dict(d)
        heads = base.num_attention_heads
        return qwen3_text(
            base,
            mrope_section=tuple(int(x) for x in pick(rope, "mrope_section", DEFAULT_MROPE_SECTION)),
            attention_bias=bool(pick(text, "attention_bias", False)),
            attention_head_dim=int(pick(text, "head_dim", base.hidden_size // heads)),
        )

    def text_to_hf_dict(self) -> dict[str, Any]:
        t = self.text
        out = t.to_hf_dict(self.model_type)
        del out["use_sliding_window"]  # not a Qwen3-VL text field
        out["rope_parameters"]["mrope_interleaved"] = True
        out.update(head_dim=t.head_dim, attention_bias=t.attention_bias)
        return out


QWEN3_VL_2B = Qwen3VLConfig()
QWEN3_VL_8B = Qwen3VLConfig(
    text=qwen3_text(TextConfig(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=5e6, mrope_section=DEFAULT_MROPE_SECTION,
        max_position_embeddings=262144, attention_bias=False,
    ), attention_head_dim=128),
    vision=Qwen3VisionConfig(depth=27, embed_dim=1152, intermediate_size=4304, deepstack_visual_indexes=(8, 16, 24),
                             out_hidden_size=4096),
    tie_word_embeddings=False,
)  # fmt: skip


def tiny_config(**text_overrides) -> Qwen3VLConfig:
    """The tiny Qwen3-VL: the tiny decoder with a third layer (so that one layer follows the DeepStack
    ones), and 3 vision blocks with DeepStack taps after blocks 0 and 1 (the last block is no tap); a 4x4
    position table, so test images interpolate it both up and down."""
    text = qwen3_text(tiny_text_config(**{"num_hidden_layers": 3, "attention_bias": False, **text_overrides}))
    vision = Qwen3VisionConfig(depth=3, embed_dim=32, num_heads=2, intermediate_size=48, num_position_embeddings=16,
                               deepstack_visual_indexes=(0, 1), out_hidden_size=text.hidden_size)  # fmt: skip
    return with_token_ids(Qwen3VLConfig(text=text, vision=vision, tie_word_embeddings=True))
