"""Qwen2-VL hyper-parameters, read from and written to a Hugging Face `config.json`.

Both layouts in the wild are accepted: the hub's flat one (text fields at the top level,
`rope_scaling.mrope_section`) and transformers 5's nested one (`text_config`,
`rope_parameters`). `to_hf_dict` writes the nested layout, which transformers 5 loads.

The decoder's config, ``pick`` and the ``config.json`` reader are every backbone's
(``g2e_jax.models.common.config``). Qwen2.5-VL (``g2e_jax.models.qwen2_5_vl.config``), of the same
family, shares the rest but the vision config: its config class is this one with another
``vision_class``, ``model_type`` and ``architecture``, and its tiny config uses ``with_token_ids``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from g2e_jax.models.common.config import HFConfig, TextConfig, pick, tiny_text_config
from g2e_jax.models.common.hf_files import special_token_ids


class VisionSizes:
    """Sizes every vision config derives alike from its fields (embed_dim, num_heads, patch sizes)."""

    hf_out_field: ClassVar[str] = "out_hidden_size"  # the HF vision_config name of out_hidden_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened processor patch: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def patch_embed_shape(self) -> tuple[int, ...]:
        """The HF patch-embedding conv weight's shape (``FLATTEN_CONV`` un-flattens to it)."""
        return (self.embed_dim, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionSizes):
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    out_hidden_size: int = 1536  # text hidden size the merger projects to (HF: vision_config.hidden_size)

    hf_out_field: ClassVar[str] = "hidden_size"

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @classmethod
    def from_hf_dict(cls, vd: dict[str, Any], text_hidden_size: int) -> "VisionConfig":
        d, rope = cls(), dict(vd.get("rope_parameters") or {})
        return cls(
            depth=int(pick(vd, "depth", d.depth)),
            embed_dim=int(pick(vd, "embed_dim", d.embed_dim)),
            num_heads=int(pick(vd, "num_heads", d.num_heads)),
            mlp_ratio=float(pick(vd, "mlp_ratio", d.mlp_ratio)),
            hidden_act=str(pick(vd, "hidden_act", d.hidden_act)),
            in_channels=int(pick(vd, "in_channels", pick(vd, "in_chans", d.in_channels))),
            patch_size=int(pick(vd, "patch_size", d.patch_size)),
            temporal_patch_size=int(pick(vd, "temporal_patch_size", d.temporal_patch_size)),
            spatial_merge_size=int(pick(vd, "spatial_merge_size", d.spatial_merge_size)),
            rope_theta=float(pick(rope, "rope_theta", d.rope_theta)),
            out_hidden_size=int(pick(vd, "hidden_size", text_hidden_size)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "qwen2_vl_vision",
            "depth": self.depth,
            "embed_dim": self.embed_dim,
            "hidden_size": self.out_hidden_size,
            "num_heads": self.num_heads,
            "mlp_ratio": int(self.mlp_ratio) if float(self.mlp_ratio).is_integer() else self.mlp_ratio,
            "hidden_act": self.hidden_act,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta},
        }


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(HFConfig):
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True
    model_type: str = "qwen2_vl"

    vision_class: ClassVar[type] = VisionConfig
    architecture: ClassVar[str] = "Qwen2VLForConditionalGeneration"

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(
                f"hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {t.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{t.num_key_value_heads}"
            )
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(
                f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if v.embed_dim % v.num_heads or v.head_dim % 4:
            raise ValueError(
                f"vision embed_dim {v.embed_dim} / num_heads {v.num_heads} must give a head_dim divisible by 4"
            )
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(
                f"vision_config.{v.hf_out_field} {v.out_hidden_size} must equal the text hidden_size "
                f"{t.hidden_size}"
            )

    # --- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def text_from_hf_dict(cls, d: dict[str, Any]) -> TextConfig:
        """The decoder's config from the whole config.json (Qwen3-VL reads more of it)."""
        return TextConfig.from_hf_dict(d)

    def text_to_hf_dict(self) -> dict[str, Any]:
        return self.text.to_hf_dict(self.model_type)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json"):
        cls.check_model_type(d, source)
        text = cls.text_from_hf_dict(d)
        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = (d.get("text_config") or {}).get("tie_word_embeddings", False)
        return cls(
            text=text,
            vision=cls.vision_class.from_hf_dict(dict(d.get("vision_config") or {}), text.hidden_size),
            image_token_id=int(pick(d, "image_token_id", cls.image_token_id)),
            video_token_id=int(pick(d, "video_token_id", cls.video_token_id)),
            vision_start_token_id=int(pick(d, "vision_start_token_id", cls.vision_start_token_id)),
            vision_end_token_id=int(pick(d, "vision_end_token_id", cls.vision_end_token_id)),
            tie_word_embeddings=bool(tie),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": self.text_to_hf_dict(),
            "vision_config": self.vision.to_hf_dict(),
        }


# --- the tiny random model (the embedded default of the demo and the tests) ----------------------


def with_token_ids(cfg):
    """The config with the special-token ids of the shipped tiny tokenizer."""
    ids = special_token_ids()
    return cfg.replace(
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )


def tiny_config(**text_overrides) -> Qwen2VLConfig:
    """The tiny Qwen2-VL: the tiny decoder and 2 vision blocks with a 2x2 spatial merge."""
    text = tiny_text_config(**text_overrides)
    vision = VisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, out_hidden_size=text.hidden_size)
    return with_token_ids(Qwen2VLConfig(text=text, vision=vision, tie_word_embeddings=True))
