"""LLaVA-NeXT hyper-parameters, read from and written to a Hugging Face ``config.json``.

The decoder is the common ``TextConfig`` read from ``text_config`` (Llama or Mistral): no q/k/v biases,
and 1-D RoPE as a single M-RoPE section spanning the half head. The vision tower is CLIP's
(``vision_config``, ``clip_vision_model``). Defaults are ``llava-hf/llava-v1.6-mistral-7b-hf``'s
(``LLAVA_V1_6_MISTRAL_7B``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from g2e_jax.models.common.config import HFConfig, TextConfig, pick, tiny_text_config

SELECT_STRATEGIES = ("default",)  # "full" keeps CLS, which transformers' anyres packing cannot tile
# llava-hf/llava-v1.6-*: (height, width) of the tile grids "anyres" chooses from.
PINPOINTS_336 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    depth: int = 24  # HF: num_hidden_layers
    embed_dim: int = 1024  # HF: hidden_size
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    in_channels: int = 3
    image_size: int = 336  # one tile's side in pixels
    patch_size: int = 14
    projection_dim: int = 768  # CLIP's own head, unused by LLaVA; kept for the round trip

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1  # + CLS

    @property
    def patch_dim(self) -> int:
        """One row of the Embedder's packed ``pixel_values``: a whole tile, C * S * S."""
        return self.in_channels * self.image_size**2

    @property
    def patch_embed_shape(self) -> tuple[int, ...]:
        return (self.embed_dim, self.in_channels, self.patch_size, self.patch_size)

    @classmethod
    def from_hf_dict(cls, vd: dict[str, Any]) -> "ClipVisionConfig":
        d = cls()
        return cls(
            depth=int(pick(vd, "num_hidden_layers", d.depth)),
            embed_dim=int(pick(vd, "hidden_size", d.embed_dim)),
            num_heads=int(pick(vd, "num_attention_heads", d.num_heads)),
            intermediate_size=int(pick(vd, "intermediate_size", d.intermediate_size)),
            hidden_act=str(pick(vd, "hidden_act", d.hidden_act)),
            layer_norm_eps=float(pick(vd, "layer_norm_eps", d.layer_norm_eps)),
            in_channels=int(pick(vd, "num_channels", d.in_channels)),
            image_size=int(pick(vd, "image_size", d.image_size)),
            patch_size=int(pick(vd, "patch_size", d.patch_size)),
            projection_dim=int(pick(vd, "projection_dim", d.projection_dim)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "clip_vision_model",
            "num_hidden_layers": self.depth,
            "hidden_size": self.embed_dim,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "num_channels": self.in_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "projection_dim": self.projection_dim,
            "attention_dropout": 0.0,
        }


def _text_7b() -> TextConfig:
    return one_d_rope(
        TextConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            max_position_embeddings=32768,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def one_d_rope(text: TextConfig) -> TextConfig:
    """The decoder config with Llama/Mistral's 1-D RoPE (one section) and no q/k/v biases."""
    return dataclasses.replace(text, mrope_section=(text.head_dim // 2,), attention_bias=False)


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(HFConfig):
    text: TextConfig = dataclasses.field(default_factory=_text_7b)
    vision: ClipVisionConfig = dataclasses.field(default_factory=ClipVisionConfig)
    text_model_type: str = "mistral"  # text_config.model_type: mistral or llama
    sliding_window: int | None = None  # Mistral's; sequences longer than it are refused
    image_token_id: int = 32000  # HF: image_token_index
    image_grid_pinpoints: tuple[tuple[int, int], ...] = PINPOINTS_336
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    model_type: str = "llava_next"

    architecture: ClassVar[str] = "LlavaNextForConditionalGeneration"

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(
                f"text hidden_size {t.hidden_size}, num_attention_heads {t.num_attention_heads} and "
                f"num_key_value_heads {t.num_key_value_heads} do not divide"
            )
        if t.mrope_section != (t.head_dim // 2,) or t.attention_bias:
            raise ValueError("LLaVA-NeXT's decoder uses 1-D RoPE without q/k/v biases (see one_d_rope)")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}; "
                f"supported: {', '.join(SELECT_STRATEGIES)}"
            )
        if not -(v.depth + 1) <= self.vision_feature_layer <= v.depth:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is outside the {v.depth} CLIP layers"
            )
        if v.embed_dim % v.num_heads or v.image_size % v.patch_size:
            raise ValueError(
                f"vision hidden_size {v.embed_dim} / num_attention_heads {v.num_heads} and image_size "
                f"{v.image_size} / patch_size {v.patch_size} must divide"
            )
        for h, w in self.image_grid_pinpoints:
            if h % v.image_size or w % v.image_size:
                raise ValueError(
                    f"image_grid_pinpoints entry {[h, w]} is not a multiple of the tile size {v.image_size}"
                )

    @property
    def feature_layers(self) -> int:
        """CLIP layers run: hidden state ``vision_feature_layer`` (0: the embeddings) is the last needed."""
        n = self.vision.depth + 1
        return self.vision_feature_layer % n

    @property
    def anyres(self):
        from g2e_jax.models.llava_next.anyres import Geometry

        return Geometry(self.image_grid_pinpoints, self.vision.image_size, self.vision.grid)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlavaNextConfig":
        cls.check_model_type(d, source)
        td = dict(d.get("text_config") or {})
        text_type = td.get("model_type", "llama")
        if text_type not in ("llama", "mistral"):
            raise ValueError(f"{source}: text_config.model_type {text_type!r}; supported: llama, mistral")
        if td.get("attention_bias") or td.get("mlp_bias"):
            raise ValueError(f"{source}: text_config attention_bias / mlp_bias are not supported")
        rope = dict(td.get("rope_parameters") or td.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(
                f"{source}: text_config rope_type {rope.get('rope_type')!r}: only 'default' is supported"
            )
        layer = pick(d, "vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"{source}: vision_feature_layer {layer!r}: only one layer is supported")
        d7 = _text_7b()
        t = TextConfig.from_hf_dict({"text_config": td})
        text = one_d_rope(
            dataclasses.replace(
                t,
                vocab_size=int(pick(td, "vocab_size", d7.vocab_size)),
                rms_norm_eps=float(pick(td, "rms_norm_eps", 1e-6 if text_type == "mistral" else 1e-5)),
                rope_theta=float(
                    pick(dict(td.get("rope_parameters") or {}), "rope_theta", pick(td, "rope_theta", 10000.0))
                ),
                bos_token_id=td.get("bos_token_id", 1),
                eos_token_id=td.get("eos_token_id", 2),
            )
        )
        head_dim = td.get("head_dim")
        if head_dim is not None and int(head_dim) != text.head_dim:
            raise ValueError(
                f"{source}: text_config.head_dim {head_dim} is not hidden_size / num_attention_heads"
            )
        tie = d.get("tie_word_embeddings", td.get("tie_word_embeddings", False))
        try:
            return cls(
                text=text,
                vision=ClipVisionConfig.from_hf_dict(dict(d.get("vision_config") or {})),
                text_model_type=text_type,
                sliding_window=td.get("sliding_window") if text_type == "mistral" else None,
                image_token_id=int(
                    pick(d, "image_token_index", pick(d, "image_token_id", cls.image_token_id))
                ),
                image_grid_pinpoints=tuple(
                    tuple(int(x) for x in p) for p in pick(d, "image_grid_pinpoints", PINPOINTS_336)
                ),
                vision_feature_layer=int(layer),
                vision_feature_select_strategy=str(pick(d, "vision_feature_select_strategy", "default")),
                projector_hidden_act=str(pick(d, "projector_hidden_act", "gelu")),
                multimodal_projector_bias=bool(pick(d, "multimodal_projector_bias", True)),
                tie_word_embeddings=bool(tie),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        t = self.text
        text = {
            "model_type": self.text_model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
        }
        if self.text_model_type == "mistral":
            text["sliding_window"] = self.sliding_window
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "image_token_index": self.image_token_id,
            "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text,
            "vision_config": self.vision.to_hf_dict(),
        }


LLAVA_V1_6_MISTRAL_7B = LlavaNextConfig()


def tiny_config(**text_overrides) -> LlavaNextConfig:
    """The tiny LLaVA-NeXT: the tiny decoder (1-D RoPE, no q/k/v biases), a 3-layer CLIP on 28-pixel tiles
    of 4x4 patches (the second-to-last layer's features, CLS dropped), and llava-v1.6's pinpoints scaled
    from 336 to 28 pixels per tile."""
    from g2e_jax.models.llava_next.hf_files import special_token_ids

    ids = special_token_ids()
    text = one_d_rope(
        tiny_text_config(
            vocab_size=ids["vocab_size"],
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            rope_theta=1e4,
            rms_norm_eps=1e-5,
            **text_overrides,
        )
    )
    vision = ClipVisionConfig(
        depth=3,
        embed_dim=32,
        num_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
        projection_dim=16,
    )
    pinpoints = tuple((h // 12, w // 12) for h, w in PINPOINTS_336)
    return LlavaNextConfig(
        text=text,
        vision=vision,
        image_token_id=ids["image"],
        image_grid_pinpoints=pinpoints,
        sliding_window=None,
    )
