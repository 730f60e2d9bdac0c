"""Non-weight Hugging Face files of the tiny random Qwen3-VL ("make-tiny"): Qwen2-VL's writer (the shared
tiny tokenizer, ``tokenizer_config.json``, ``preprocessor_config.json``) with Qwen3-VL's differences.

- Chat template: Qwen3-VL's renders like Qwen2-VL's for text and image parts, but adds no default
  system message when the conversation has none (Qwen2-VL's adds "You are a helpful assistant.").
  Written in our own words, as Qwen2-VL's.
- Image processor: ``Qwen2VLImageProcessor`` with patch 16 (a 32-pixel factor with the 2x2 merge) and
  mean = std = 0.5, as the released checkpoints' ``preprocessor_config.json``; small pixel bounds
  (4 to 64 merged tokens) keep the tests fast.
"""

from __future__ import annotations

from pathlib import Path

from g2e_jax.models.common.hf_files import special_token_ids
from g2e_jax.models.qwen2_vl.hf_files import CHAT_TEMPLATE as QWEN2_VL_TEMPLATE
from g2e_jax.models.qwen2_vl.hf_files import DEFAULT_SYSTEM_PROMPT, write_processor_files

_DEFAULT_SYSTEM = (
    "  {%- if loop.first and message['role'] != 'system' -%}\n"
    "    {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}\n"
    "  {%- endif -%}\n"
)
if _DEFAULT_SYSTEM not in QWEN2_VL_TEMPLATE:  # a changed Qwen2-VL template must not change this one silently
    raise RuntimeError("the Qwen2-VL tiny chat template no longer holds its default-system clause")
CHAT_TEMPLATE = QWEN2_VL_TEMPLATE.replace(_DEFAULT_SYSTEM, "")

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


def write_tiny_files(out_dir: str | Path, cfg) -> Path:
    """The tiny Qwen3-VL directory's tokenizer and processor files, for the config ``cfg``."""
    vocab = special_token_ids()["vocab_size"]
    if cfg.text.vocab_size < vocab:
        raise ValueError(f"vocab_size {cfg.text.vocab_size} is smaller than the tiny tokenizer's {vocab}")
    v = cfg.vision
    factor = v.patch_size * v.spatial_merge_size
    return write_processor_files(
        out_dir, min_pixels=factor * factor * 4, max_pixels=factor * factor * 64, patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size, image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
