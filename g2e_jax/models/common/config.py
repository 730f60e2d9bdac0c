"""What every backbone's config shares: reading ``config.json``, the ``pick`` of a field with its
default, the decoder's ``TextConfig`` (Qwen2-VL's decoder; LLaVA-NeXT reads its Llama/Mistral decoder
into it), the tiny decoder, and ``HFConfig``'s ``replace`` / ``from_json`` / model_type check."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from g2e_jax.models.common.hf_files import special_token_ids


def pick(src: dict, key: str, default):
    """``src[key]``, or ``default`` when it is missing or null."""
    value = src.get(key)
    return default if value is None else value


def read_hf_config(path: str | Path) -> tuple[dict[str, Any], str]:
    """The parsed ``config.json`` of a model directory (or the file itself), and its path for messages."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a local Hugging Face model directory)")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


class HFConfig:
    """Mixed into every backbone's config dataclass (which defines ``model_type`` and ``from_hf_dict``)."""

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_hf_dict(*read_hf_config(path))

    @classmethod
    def check_model_type(cls, d: dict[str, Any], source: str) -> None:
        if d.get("model_type") != cls.model_type:
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not {cls.model_type!r}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The decoder's hyper-parameters; defaults are Qwen2-VL-2B's, and ``to_hf_dict`` writes Qwen2-VL's
    ``text_config`` (LLaVA-NeXT writes its own)."""

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
    attention_bias: bool = True  # q/k/v biases: Qwen2 has them, Llama/Mistral (LLaVA-NeXT) and Qwen3 do not
    # Qwen3-VL's decoder (g2e_jax.models.qwen3_vl): RMSNorm of q and k over head_dim before RoPE;
    # M-RoPE sections interleaved over the frequencies (T H W T H W ...) instead of contiguous; and a
    # head_dim written in config.json (None: hidden_size / num_attention_heads).
    qk_norm: bool = False
    mrope_interleaved: bool = False
    attention_head_dim: int | None = None

    @property
    def head_dim(self) -> int:
        if self.attention_head_dim is not None:
            return self.attention_head_dim
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "TextConfig":
        """From a whole config.json: ``text_config``, or the top level (hub layout)."""
        text = dict(d.get("text_config") or {})
        for key, value in d.items():  # hub layout: text fields live at the top level
            if key not in ("text_config", "vision_config"):
                text.setdefault(key, value)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        t = cls()
        return cls(
            vocab_size=int(pick(text, "vocab_size", t.vocab_size)),
            hidden_size=int(pick(text, "hidden_size", t.hidden_size)),
            intermediate_size=int(pick(text, "intermediate_size", t.intermediate_size)),
            num_hidden_layers=int(pick(text, "num_hidden_layers", t.num_hidden_layers)),
            num_attention_heads=int(pick(text, "num_attention_heads", t.num_attention_heads)),
            num_key_value_heads=int(
                pick(text, "num_key_value_heads", pick(text, "num_attention_heads", t.num_key_value_heads))
            ),
            hidden_act=str(pick(text, "hidden_act", t.hidden_act)),
            rms_norm_eps=float(pick(text, "rms_norm_eps", t.rms_norm_eps)),
            rope_theta=float(pick(rope, "rope_theta", pick(text, "rope_theta", t.rope_theta))),
            mrope_section=tuple(int(x) for x in pick(rope, "mrope_section", t.mrope_section)),
            max_position_embeddings=int(pick(text, "max_position_embeddings", t.max_position_embeddings)),
            bos_token_id=text.get("bos_token_id", t.bos_token_id),
            eos_token_id=text.get("eos_token_id", t.eos_token_id),
        )

    def to_hf_dict(self, model_type: str) -> dict[str, Any]:
        return {
            "model_type": f"{model_type}_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "mrope_section": list(self.mrope_section),
            },
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
        }


def tiny_text_config(**overrides) -> TextConfig:
    """Every tiny backbone's decoder: 2 layers, grouped-query attention, M-RoPE sections, over the shipped
    tiny tokenizer's vocabulary (``<|im_end|>`` ends a turn)."""
    ids = special_token_ids()
    text = TextConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        rope_theta=1e6,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=ids["im_end"],
    )
    return dataclasses.replace(text, **overrides)
