"""Qwen2-VL hyper-parameters, read from and written to a Hugging Face `config.json`.

Both layouts in the wild are accepted: the hub's flat one (text fields at the top level,
`rope_scaling.mrope_section`) and transformers 5's nested one (`text_config`,
`rope_parameters`). `to_hf_dict` writes the nested layout, which transformers 5 loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
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

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened processor patch: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True
    model_type: str = "qwen2_vl"

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
                f"vision_config.hidden_size {v.out_hidden_size} must equal the text hidden_size {t.hidden_size}"
            )

    def replace(self, **kw) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **kw)

    # --- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "Qwen2VLConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        text = dict(d.get("text_config") or {})
        for key, value in d.items():  # hub layout: text fields live at the top level
            if key not in ("text_config", "vision_config"):
                text.setdefault(key, value)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        vd = dict(d.get("vision_config") or {})
        vrope = dict(vd.get("rope_parameters") or {})

        def pick(src, key, default):
            value = src.get(key)
            return default if value is None else value

        tdef, vdef = TextConfig(), VisionConfig()
        text_cfg = TextConfig(
            vocab_size=int(pick(text, "vocab_size", tdef.vocab_size)),
            hidden_size=int(pick(text, "hidden_size", tdef.hidden_size)),
            intermediate_size=int(pick(text, "intermediate_size", tdef.intermediate_size)),
            num_hidden_layers=int(pick(text, "num_hidden_layers", tdef.num_hidden_layers)),
            num_attention_heads=int(pick(text, "num_attention_heads", tdef.num_attention_heads)),
            num_key_value_heads=int(
                pick(text, "num_key_value_heads", pick(text, "num_attention_heads", tdef.num_key_value_heads))
            ),
            hidden_act=str(pick(text, "hidden_act", tdef.hidden_act)),
            rms_norm_eps=float(pick(text, "rms_norm_eps", tdef.rms_norm_eps)),
            rope_theta=float(pick(rope, "rope_theta", pick(text, "rope_theta", tdef.rope_theta))),
            mrope_section=tuple(int(x) for x in pick(rope, "mrope_section", tdef.mrope_section)),
            max_position_embeddings=int(pick(text, "max_position_embeddings", tdef.max_position_embeddings)),
            bos_token_id=text.get("bos_token_id", tdef.bos_token_id),
            eos_token_id=text.get("eos_token_id", tdef.eos_token_id),
        )
        vision_cfg = VisionConfig(
            depth=int(pick(vd, "depth", vdef.depth)),
            embed_dim=int(pick(vd, "embed_dim", vdef.embed_dim)),
            num_heads=int(pick(vd, "num_heads", vdef.num_heads)),
            mlp_ratio=float(pick(vd, "mlp_ratio", vdef.mlp_ratio)),
            hidden_act=str(pick(vd, "hidden_act", vdef.hidden_act)),
            in_channels=int(pick(vd, "in_channels", pick(vd, "in_chans", vdef.in_channels))),
            patch_size=int(pick(vd, "patch_size", vdef.patch_size)),
            temporal_patch_size=int(pick(vd, "temporal_patch_size", vdef.temporal_patch_size)),
            spatial_merge_size=int(pick(vd, "spatial_merge_size", vdef.spatial_merge_size)),
            rope_theta=float(pick(vrope, "rope_theta", vdef.rope_theta)),
            out_hidden_size=int(pick(vd, "hidden_size", text_cfg.hidden_size)),
        )
        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = (d.get("text_config") or {}).get("tie_word_embeddings", False)
        return cls(
            text=text_cfg,
            vision=vision_cfg,
            image_token_id=int(pick(d, "image_token_id", cls.image_token_id)),
            video_token_id=int(pick(d, "video_token_id", cls.video_token_id)),
            vision_start_token_id=int(pick(d, "vision_start_token_id", cls.vision_start_token_id)),
            vision_end_token_id=int(pick(d, "vision_end_token_id", cls.vision_end_token_id)),
            tie_word_embeddings=bool(tie),
            model_type=model_type,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen2VLConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a local Hugging Face model directory)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": self.model_type,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": t.hidden_act,
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                },
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
                "attention_dropout": 0.0,
                "use_sliding_window": False,
            },
            "vision_config": {
                "model_type": "qwen2_vl_vision",
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "hidden_size": v.out_hidden_size,
                "num_heads": v.num_heads,
                "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
                "hidden_act": v.hidden_act,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }
