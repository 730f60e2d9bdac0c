"""The tiny tokenizer every tiny model directory is built on (``assets/tiny_tokenizer.json``): the small
byte-level BPE trained by ``tools/train_tiny_tokenizer.py`` with Qwen2's pre-tokenisation and the Qwen2-VL
special tokens at the end of its vocabulary (LLaVA-NeXT's tiny tokenizer adds its own to it), and the
ids of those tokens, read from the file so that no config.json can disagree with it."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TOKENIZER_ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny_tokenizer.json"

SPECIAL_TOKEN_NAMES = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "vision_pad": "<|vision_pad|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
}


@lru_cache(maxsize=None)
def _special_token_ids(path: str) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    ids = {name: added[tok] for name, tok in SPECIAL_TOKEN_NAMES.items()}
    ids["vocab_size"] = max(max(data["model"]["vocab"].values()), max(added.values())) + 1
    return ids


def special_token_ids(tokenizer_json_path: str | Path = TOKENIZER_ASSET) -> dict:
    """Ids read from the tokenizer file itself, so config.json can never disagree with it."""
    return dict(_special_token_ids(str(tokenizer_json_path)))
