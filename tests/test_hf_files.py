"""Offline checks of the make-tiny tokenizer, chat template and processor files."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from g2e_jax.models.qwen2_vl import hf_files  # noqa: E402

UNICODE_TEXTS = [
    "  héllo\n\twörld 日本 🙂 ",
    "Given an image, summarize the provided image in one word.",
    "e\u0301 NFC-composable, \r\n\r\n tabs\t\tand 12345 digits; ١٢٣ ÆØÅ ß ﬁ",
    "",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return hf_files.write_processor_files(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return hf_files.load_hf_processor(tiny_dir)


def test_asset_is_small_and_ids_are_consecutive():
    assert hf_files.TOKENIZER_ASSET.stat().st_size < 150_000
    ids = hf_files.special_token_ids()
    names = [
        "endoftext",
        "im_start",
        "im_end",
        "vision_start",
        "vision_end",
        "vision_pad",
        "image_pad",
        "video_pad",
    ]
    first = ids["endoftext"]
    assert [ids[n] for n in names] == list(range(first, first + len(names)))
    assert ids["vocab_size"] == first + len(names)
    raw = Tokenizer.from_file(str(hf_files.TOKENIZER_ASSET))
    assert raw.get_vocab_size(with_added_tokens=True) == ids["vocab_size"]
    assert raw.post_processor is None


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip_raw_and_hf(text, hf_tokenizer):
    import unicodedata

    raw = Tokenizer.from_file(str(hf_files.TOKENIZER_ASSET))
    expected = unicodedata.normalize("NFC", text)
    raw_ids = raw.encode(text).ids
    assert raw.decode(raw_ids, skip_special_tokens=False) == expected
    hf_ids = hf_tokenizer(text)["input_ids"]
    assert hf_ids == raw_ids  # Qwen2Tokenizer rebuilds the same pipeline: no BOS/EOS, same merges
    assert hf_tokenizer.decode(hf_ids) == expected
    assert hf_files.special_token_ids()["endoftext"] not in raw_ids  # no unknown/fallback tokens


def test_specials_are_single_tokens(hf_tokenizer):
    ids = hf_files.special_token_ids()
    for name, tok in hf_files.SPECIAL_TOKEN_NAMES.items():
        assert hf_tokenizer(tok)["input_ids"] == [ids[name]]
        assert hf_tokenizer.convert_ids_to_tokens(ids[name]) == tok
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    got = hf_tokenizer(text)["input_ids"]
    assert got[0] == ids["im_start"] and got[-1] == ids["im_end"]
    assert got.count(ids["image_pad"]) == 1
    assert hf_tokenizer.eos_token_id == ids["im_end"]
    assert hf_tokenizer.pad_token_id == ids["endoftext"]
    assert hf_tokenizer.model_max_length == 32768
    assert hf_tokenizer.padding_side == "right"


def test_chat_template(hf_tokenizer, processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Represent the given text in one word."},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nRepresent the given text in one word.<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
    )
    assert hf_tokenizer.apply_chat_template(msgs, tokenize=False) == expected


def test_preprocessor_config(tiny_dir):
    cfg = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert cfg["image_processor_type"] == "Qwen2VLImageProcessor"
    assert cfg["size"] == {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}
    assert not (tiny_dir / "config.json").exists()


def test_processor_mixed_batch(processor):
    ids = hf_files.special_token_ids()
    rng = np.random.default_rng(0)
    img_a = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
    img_b = Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8))  # H=84, W=112
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"{vis}A photo.", "Only text in this row, nothing else.", f"Two: {vis}"]
    out = processor(text=texts, images=[img_a, img_b], padding=True, return_tensors="np")

    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert isinstance(out[key], np.ndarray), key
    grid = out["image_grid_thw"]
    np.testing.assert_array_equal(grid, [[1, 4, 4], [1, 6, 8]])
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)

    n_pad = (out["input_ids"] == ids["image_pad"]).sum(-1)
    merge = processor.image_processor.merge_size**2
    np.testing.assert_array_equal(n_pad, [grid[0].prod() // merge, 0, grid[1].prod() // merge])
    np.testing.assert_array_equal(
        out["mm_token_type_ids"], (out["input_ids"] == ids["image_pad"]).astype(int)
    )

    # Right padding with <|endoftext|>.
    mask = out["attention_mask"]
    lengths = mask.sum(-1)
    for row, n in enumerate(lengths):
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (out["input_ids"][row, n:] == ids["endoftext"]).all()

    text_only = processor(text=["plain", "a longer text row"], images=None, padding=True, return_tensors="np")
    assert "pixel_values" not in text_only
    assert text_only["input_ids"].shape == text_only["mm_token_type_ids"].shape
