"""Qwen2.5-VL hyper-parameters: its family's (Qwen2-VL's) config (text decoder, token ids, both
config.json layouts) with Qwen2.5-VL's vision tower: RMSNorm, a SwiGLU MLP of its own width, window
attention except in ``fullatt_block_indexes``, and ``out_hidden_size`` naming the merger's output width.

Defaults are Qwen2.5-VL-3B-Instruct's (``QWEN2_5_VL_3B``); ``QWEN2_5_VL_7B`` is the 7B model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from g2e_jax.models.common.config import TextConfig, pick, tiny_text_config
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, VisionSizes, with_token_ids


@dataclasses.dataclass(frozen=True)
class Qwen2_5VisionConfig(VisionSizes):
    depth: int = 32
    embed_dim: int = 1280  # HF: vision_config.hidden_size
    num_heads: int = 16
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels per window side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2  # video positions only; kept so that config.json survives a round trip
    rope_theta: float = 10000.0
    out_hidden_size: int = 2048

    def __post_init__(self):
        if self.window_merged < 1:
            raise ValueError(
                f"vision window_size {self.window_size} must be at least patch_size x spatial_merge_size = "
                f"{self.patch_size * self.spatial_merge_size}"
            )

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def window_merged(self) -> int:
        """Merged tokens per window side (transformers' ``vit_merger_window_size``)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """Patches in a whole window (windows at the right and bottom edges hold fewer)."""
        return (self.window_merged * self.spatial_merge_size) ** 2

    @classmethod
    def from_hf_dict(cls, vd: dict[str, Any], text_hidden_size: int) -> "Qwen2_5VisionConfig":
        d, rope = cls(), dict(vd.get("rope_parameters") or {})
        return cls(
            depth=int(pick(vd, "depth", d.depth)),
            embed_dim=int(pick(vd, "hidden_size", d.embed_dim)),
            num_heads=int(pick(vd, "num_heads", d.num_heads)),
            intermediate_size=int(pick(vd, "intermediate_size", d.intermediate_size)),
            hidden_act=str(pick(vd, "hidden_act", d.hidden_act)),
            in_channels=int(pick(vd, "in_channels", pick(vd, "in_chans", d.in_channels))),
            patch_size=int(pick(vd, "patch_size", d.patch_size)),
            temporal_patch_size=int(pick(vd, "temporal_patch_size", d.temporal_patch_size)),
            spatial_merge_size=int(pick(vd, "spatial_merge_size", d.spatial_merge_size)),
            window_size=int(pick(vd, "window_size", d.window_size)),
            fullatt_block_indexes=tuple(
                int(i) for i in pick(vd, "fullatt_block_indexes", d.fullatt_block_indexes)
            ),
            tokens_per_second=int(pick(vd, "tokens_per_second", d.tokens_per_second)),
            rope_theta=float(pick(rope, "rope_theta", d.rope_theta)),
            out_hidden_size=int(pick(vd, "out_hidden_size", text_hidden_size)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "qwen2_5_vl_vision",
            "depth": self.depth,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "hidden_act": self.hidden_act,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "window_size": self.window_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes),
            "tokens_per_second": self.tokens_per_second,
            "out_hidden_size": self.out_hidden_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }


def _text_3b() -> TextConfig:
    return TextConfig(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                      num_key_value_heads=2, max_position_embeddings=128000)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Qwen2_5VLConfig(Qwen2VLConfig):
    text: TextConfig = dataclasses.field(default_factory=_text_3b)
    vision: Qwen2_5VisionConfig = dataclasses.field(default_factory=Qwen2_5VisionConfig)
    model_type: str = "qwen2_5_vl"

    vision_class: ClassVar[type] = Qwen2_5VisionConfig
    architecture: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"


QWEN2_5_VL_3B = Qwen2_5VLConfig()
QWEN2_5_VL_7B = Qwen2_5VLConfig(
    text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000),
    vision=Qwen2_5VisionConfig(out_hidden_size=3584),
    tie_word_embeddings=False,
)  # fmt: skip


def tiny_config(**text_overrides) -> Qwen2_5VLConfig:
    """The tiny Qwen2.5-VL: the tiny decoder and 2 vision blocks, the first windowed (windows of 2x2
    merged tokens, so most test images do not divide into whole windows) and the second full."""
    text = tiny_text_config(**text_overrides)
    vision = Qwen2_5VisionConfig(depth=2, embed_dim=32, num_heads=2, intermediate_size=56, window_size=56,
                                 fullatt_block_indexes=(1,), out_hidden_size=text.hidden_size)  # fmt: skip
    return with_token_ids(Qwen2_5VLConfig(text=text, vision=vision, tie_word_embeddings=True))
