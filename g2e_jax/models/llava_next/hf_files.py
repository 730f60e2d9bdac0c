"""Non-weight Hugging Face files of a tiny random LLaVA-NeXT directory ("make-tiny --arch llava_next").

The tokenizer is the shipped tiny byte-level BPE (``assets/tiny_tokenizer.json``) with LLaVA-NeXT's
special tokens added (``<unk>``, ``<s>``, ``</s>``, ``<image>``) and a post-processor that puts ``<s>`` in
front, as Mistral's tokenizer does with its default special tokens. Everything is generated locally.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from g2e_jax.io import write_atomic
from g2e_jax.models.common.hf_files import TOKENIZER_ASSET
from g2e_jax.models.common.images import CLIP_MEAN, CLIP_STD

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}

# Mistral's [INST] format, our own words: system text (if any) starts the first user turn.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'user' -%}\n"
    "    {{- '[INST] ' -}}\n"
    "    {%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}\n"
    "      {%- for part in message['content'] -%}\n"
    "        {%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}\n"
    "        {%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}\n"
    "      {%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {{- ' [/INST]' -}}\n"
    "  {%- elif message['role'] == 'assistant' -%}\n"
    "    {{- message['content'] if message['content'] is string else message['content'][0]['text'] -}}\n"
    "    {{- eos_token -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
)


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The tiny LLaVA-NeXT tokenizer.json text (deterministic)."""
    from tokenizers import AddedToken, Tokenizer, processors

    tok = Tokenizer.from_file(str(TOKENIZER_ASSET))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok.to_str(pretty=True)


@lru_cache(maxsize=1)
def special_token_ids() -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json())
    ids = {name: tok.token_to_id(t) for name, t in SPECIAL_TOKENS.items()}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def write_processor_files(out_dir: str | Path, cfg) -> Path:
    """tokenizer.json, tokenizer_config.json, preprocessor_config.json (``LlavaNextImageProcessor``),
    processor_config.json (``LlavaNextProcessor``) and the chat template, for the config ``cfg``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tokenizer.json", tokenizer_json())
    tokens = {
        t: {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS.values()
    }
    ids = special_token_ids()
    tokenizer_config = {
        "tokenizer_class": "TokenizersBackend",  # tokenizer.json as it is
        "added_tokens_decoder": {str(ids[n]): tokens[t] for n, t in SPECIAL_TOKENS.items()},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "extra_special_tokens": {"image_token": "<image>"},
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.text.max_position_embeddings,
        "padding_side": "right",
    }
    v, side = cfg.vision, cfg.vision.image_size
    preprocessor = {
        "image_processor_type": "LlavaNextImageProcessor",
        "processor_class": "LlavaNextProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": side},
        "do_center_crop": True,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_pad": True,
        "resample": 3,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
    }
    processor = {
        "processor_class": "LlavaNextProcessor",
        "image_token": "<image>",
        "patch_size": v.patch_size,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,  # CLIP's CLS
    }
    for name, obj in (
        ("tokenizer_config.json", tokenizer_config),
        ("preprocessor_config.json", preprocessor),
        ("processor_config.json", processor),
    ):
        write_atomic(out / name, json.dumps(obj, indent=2) + "\n")
    write_atomic(out / "chat_template.jinja", CHAT_TEMPLATE)
    return out


def load_hf_processor(path: str | Path):
    """transformers' ``LlavaNextProcessor`` (PIL image processor) of a local directory, offline."""
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    path = Path(path)
    settings = json.loads((path / "processor_config.json").read_text())
    settings.pop("processor_class", None)
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil.from_pretrained(path, local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
        **settings,
    )
