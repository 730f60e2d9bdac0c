"""Non-weight Hugging Face files for a tiny random Qwen2-VL model directory ("make-tiny").

Why: the project machines cannot download the Qwen2-VL tokenizer/processor, yet parity tests need a
directory that both transformers (PyTorch reference) and our JAX code load the same way. The
tokenizer is the shared tiny BPE (``g2e_jax.models.common.hf_files``: Qwen2's exact pre-tokenisation
pipeline, ~1000 tokens, the Qwen2-VL special tokens at the end of the vocab). Qwen2.5-VL, of the same
family, writes the same files (``write_tiny_files``).

Weights and ``config.json`` are written elsewhere; the config must use the ids returned by
``special_token_ids`` (image/video/vision-start/end token ids and ``vocab_size``).

Padding: the tokenizer (and therefore the processor) pads on the RIGHT, which is the transformers
default for Qwen2; ``tokenizer_config.json`` states it explicitly so it cannot drift.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

from g2e_jax.models.common.hf_files import SPECIAL_TOKEN_NAMES, TOKENIZER_ASSET, special_token_ids
from g2e_jax.models.common.images import CLIP_MEAN, CLIP_STD

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Written in our own words, but meant to render byte-for-byte like the Qwen2-VL template for
# text/image/video parts (no "Picture N:" labels). Whitespace control (`-`) keeps the output free
# of the template's own line breaks; the only newlines are the literal "\n" strings.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "  {%- if loop.first and message['role'] != 'system' -%}\n"
    "    {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "  {%- if message['content'] is string -%}\n"
    "    {{- message['content'] -}}\n"
    "  {%- else -%}\n"
    "    {%- for part in message['content'] -%}\n"
    "      {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}\n"
    "        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "      {%- elif part['type'] == 'video' or 'video' in part -%}\n"
    "        {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "      {%- elif 'text' in part -%}\n"
    "        {{- part['text'] -}}\n"
    "      {%- endif -%}\n"
    "    {%- endfor -%}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

def _tokenizer_config(ids: dict) -> dict:
    added_tokens_decoder = {
        str(ids[name]): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name, tok in SPECIAL_TOKEN_NAMES.items()
    }
    return {
        # Qwen2Tokenizer rebuilds Qwen2's pipeline from tokenizer.json's vocab/merges; the asset uses
        # the same pipeline, so encodings are identical to the raw `tokenizers` file.
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added_tokens_decoder,
        "extra_special_tokens": [t for n, t in SPECIAL_TOKEN_NAMES.items() if n != "endoftext"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": 32768,
        "padding_side": "right",
    }


def _preprocessor_config(*, min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size, image_mean,
                         image_std) -> dict:  # fmt: skip
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "rescale_factor": 1 / 255,
        "resample": 3,  # bicubic, as Qwen2-VL
        "image_mean": list(image_mean),
        "image_std": list(image_std),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        # transformers 5 reads `size`; min/max_pixels are kept for older readers and our own code.
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "merge_size": merge_size,
    }


def write_processor_files(
    out_dir: str | Path,
    *,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 64,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write tokenizer + chat template + image-processor files; small pixel bounds keep tests fast.
    Qwen3-VL writes its own chat template, normalisation and (patch 16) pixel bounds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TOKENIZER_ASSET, out / "tokenizer.json")
    ids = special_token_ids(TOKENIZER_ASSET)
    _dump_json(out / "tokenizer_config.json", _tokenizer_config(ids))
    # transformers 5 picks up `chat_template.jinja` for both the tokenizer and the processor.
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    _dump_json(
        out / "preprocessor_config.json",
        _preprocessor_config(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            patch_size=patch_size,
            temporal_patch_size=temporal_patch_size,
            merge_size=merge_size,
            image_mean=image_mean,
            image_std=image_std,
        ),
    )
    return out


def write_tiny_files(out_dir: str | Path, cfg) -> Path:
    """The tiny Qwen2-VL / Qwen2.5-VL directory's tokenizer and processor files, for the config ``cfg``."""
    vocab = special_token_ids()["vocab_size"]
    if cfg.text.vocab_size < vocab:
        raise ValueError(f"vocab_size {cfg.text.vocab_size} is smaller than the tiny tokenizer's {vocab}")
    v = cfg.vision
    return write_processor_files(out_dir, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                 merge_size=v.spatial_merge_size)  # fmt: skip


def _dump_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@lru_cache(maxsize=None)
def _image_only_processor_class():
    # Imported lazily: transformers is a reference/test dependency, not needed by the JAX code path.
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without a video processor (the stock one needs torchvision).

        ProcessorMixin derives its sub-processors from the ``__init__`` signature, so dropping the
        ``video_processor`` argument is what removes it. Video tokens keep their id so that
        ``mm_token_type_ids`` still marks them (2), but videos cannot be processed.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    return Qwen2VLImageOnlyProcessor


def load_hf_processor(path: str | Path):
    """Hugging Face processor for a make-tiny directory that works offline and without torchvision."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    template_file = path / "chat_template.jinja"
    chat_template = template_file.read_text(encoding="utf-8") if template_file.exists() else None
    cls = _image_only_processor_class()
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
