"""The Qwen3-VL-Embedding format (prompt "qwen3_vl_embedding") and Matryoshka ``dim`` against the
reference embedding path typed out here: QwenLM/Qwen3-VL-Embedding's ``Qwen3VLEmbedder`` (conversation,
chat template with the generation prompt, right padding, the model's own positions, last non-pad
state, L2 norm) over transformers' model, written without g2e_jax's prompt code; on the tiny Qwen2-VL
and the tiny Qwen3-VL (``Qwen3VLForConditionalGeneration``, the released embedders' class).

Images: on Qwen3-VL the reference's own path, typed out: qwen_vl_utils' resize (32-pixel factor, 4,096 to
1,843,200 pixels, PIL's default bicubic), then the processor with do_resize=False; ours runs with
``min_pixels=4096, max_pixels=1843200``. On Qwen2-VL (which that code does not serve: its factor is
hard-coded to 32) the processor resizes, within the tiny model's bounds."""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import pytest

from conftest import report
from g2e_jax import Embedder

DEFAULT = "Represent the user's input."


def random_image(height, width, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# (text, image, instruction): every branch of the reference's format_model_input. An image is
# (rows, cols, seed) in units of the backbone's factor, or ("px", height, width, seed).
ROWS = [
    ("A woman playing with her dog on a beach at sunset.", None, "Retrieve images or text relevant to the query"),
    ("a caption", None, None),
    ("", (2, 3, 1), None),  # image only
    ("What is in the picture?", (4, 2, 2), "  Answer the question.  "),  # stripped, already punctuated
    ("", None, None),  # nothing: "NULL"
    ("unicodé 日本語 🙂\ttabs", None, "日本語で答えてください？"),  # ends in a full-width "？" (punctuation)
    ("  spaces around  ", None, ""),  # empty instruction: the default
    ("x " * 40, (2, 2, 3), "Instruction: retrieve"),
    ("an odd size", ("px", 37, 53, 4), None),  # resized up (under 4,096 pixels)
]  # fmt: skip
FACTOR = {"qwen2_vl": 28, "qwen3_vl": 32}
# The reference embedder's image bounds (its MIN_PIXELS, MAX_PIXELS), ours given the same on Qwen3-VL.
REFERENCE_PIXELS = (4 * 32 * 32, 1800 * 32 * 32)
PIXELS = {"qwen2_vl": {}, "qwen3_vl": {"min_pixels": REFERENCE_PIXELS[0], "max_pixels": REFERENCE_PIXELS[1]}}


def reference_conversation(text, image, instruction):
    """QwenLM/Qwen3-VL-Embedding src/models/qwen3_vl_embedding.py, format_model_input, typed out."""
    if instruction:
        instruction = instruction.strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
    content = []
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": instruction or DEFAULT}]},
        {"role": "user", "content": content},
    ]
    if not text and image is None:
        content.append({"type": "text", "text": "NULL"})
        return conversation
    if image is not None:
        content.append({"type": "image", "image": image})
    if text:
        content.append({"type": "text", "text": text})
    return conversation


def reference_render(conversation) -> str:
    """Qwen's chat template with add_generation_prompt=True (a system turn is given, so no default)."""
    out = ""
    for message in conversation:
        parts = [
            "<|vision_start|><|image_pad|><|vision_end|>" if part["type"] == "image" else part["text"]
            for part in message["content"]
        ]
        out += f"<|im_start|>{message['role']}\n" + "".join(parts) + "<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def reference_resize(image, factor=32, min_pixels=REFERENCE_PIXELS[0], max_pixels=REFERENCE_PIXELS[1]):
    """qwen_vl_utils.vision_process (fetch_image, smart_resize) as the reference calls it, typed out."""
    width, height = image.size
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return image.resize((w_bar, h_bar))


def reference_embeddings(model_dir, rows, dims, *, pre_resize: bool) -> dict:
    """Conversations -> template -> processor (right padding) -> model(**inputs) -> last one of the
    attention mask -> L2 normalise; then each Matryoshka dim: truncate, normalise again.
    ``pre_resize``: images resized as the reference does, the processor called with do_resize=False."""
    import torch

    from hf_reference import load_hf_model

    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    hf_model, processor = load_hf_model(model_dir), load_hf_processor(model_dir)
    processor.tokenizer.padding_side = "right"
    conversations = [reference_conversation(t, im, ins) for t, im, ins in rows]
    strings = [reference_render(c) for c in conversations]
    images = [im for _, im, _ in rows if im is not None]
    kwargs = {}
    if pre_resize:
        images, kwargs = [reference_resize(im) for im in images], {"do_resize": False}
    batch = processor(text=strings, images=images or None, padding=True, return_tensors="pt", **kwargs)
    with torch.no_grad():
        hidden = hf_model.model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    last = mask.shape[1] - mask.flip(dims=[1]).argmax(dim=1) - 1
    pooled = hidden[torch.arange(hidden.shape[0]), last]
    full = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    out = {None: full.numpy()}
    for dim in dims:
        out[dim] = torch.nn.functional.normalize(full[:, :dim], p=2, dim=-1).numpy()
    return out


def materialise(rows, factor):
    def image(spec):
        if spec is None:
            return None
        if spec[0] == "px":
            return random_image(*spec[1:])
        return random_image(spec[0] * factor, spec[1] * factor, spec[2])

    return [(t, image(im), ins) for t, im, ins in rows]


DIMS = (64, 32, 7, 1)  # 64: the tiny models' hidden size (no truncation)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(arch, tiny_dir, tmp_path_factory):
    if arch == "qwen2_vl":
        return tiny_dir
    from g2e_jax.models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("q3emb") / "tiny", arch=arch)


@pytest.fixture(scope="module")
def rows(arch):
    return materialise(ROWS, FACTOR[arch])


@pytest.fixture(scope="module")
def reference(arch, model_dir, rows):
    pytest.importorskip("torch")
    return reference_embeddings(model_dir, rows, DIMS, pre_resize=arch == "qwen3_vl")


@pytest.mark.parametrize("dim", [None, *DIMS])
def test_matches_reference_embedder(arch, model_dir, rows, reference, dim):
    texts, images, instructions = (list(c) for c in zip(*rows))
    emb = Embedder.from_pretrained(model_dir, dtype="float32", prompt="qwen3_vl_embedding", dim=dim, batch_size=4,
                                   max_len=512, progress=False, **PIXELS[arch])  # fmt: skip
    assert emb.config.model_type == arch
    ours = emb.encode(texts, images, role="query", instruction=instructions)
    ref = reference[dim]
    cosine = (ref * ours).sum(-1)
    report(f"qwen3_vl_embedding format vs reference embedder ({arch} tiny, dim={dim})",
           min_cosine=float(cosine.min()), one_minus_min_cosine=float(1 - cosine.min()))  # fmt: skip
    assert ours.shape == ref.shape == (len(rows), emb.dim)
    assert emb.dim == (64 if dim is None else dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert cosine.min() >= 0.99999
    # The documents' side is the same format (the default instruction when a row brings none).
    doc = emb.encode(texts[1:3], images[1:3], role="document")
    assert (np.sum(doc * ref[1:3], -1) >= 0.99999).all()


def test_same_weights_keep_the_hierarchical_prompt(model_dir, rows):
    emb = Embedder.from_pretrained(model_dir, dtype="float32", prompt="qwen3_vl_embedding", batch_size=4,
                                   max_len=512, progress=False)  # fmt: skip
    texts, images, _ = (list(c) for c in zip(*rows[:4]))
    texts[2] = "a picture"  # the hierarchical prompt has no "NULL": an empty text-less row is an error there
    hier = emb.with_prompt("hierarchical", scheme="gen2embed")
    assert hier.prompt.name == "hierarchical" and hier.state is emb.state  # no reload
    a, b = emb.encode(texts, images), hier.encode(texts, images)
    assert np.abs((a * b).sum(-1)).max() < 0.9999  # a different template, so other embeddings


def test_template_and_errors():
    from g2e_jax.prompts import get_prompt

    p = get_prompt("qwen3_vl_embedding")
    user = p.user_text("query", "<|image_1|>\nWhat is it?", has_image=True)
    assert p.render("query", user, instruction="Find it") == (
        "<|im_start|>system\nFind it.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert p.render("document", p.user_text("document", "", has_image=False)) == (
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\nNULL<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # A configured query instruction is the queries' default; the row's own replaces it.
    q = p.replace(query_system="Retrieve the matching image")
    assert q.row_system("query", None) == "Retrieve the matching image."
    assert q.row_system("query", " Other! ") == "Other!"
    assert q.row_system("document", None) == DEFAULT
    assert p.template_role("document", subset="RefCOCO-Matching") == "document"  # no Matching rule
    with pytest.raises(ValueError, match="scheme must be 'mrope'"):
        get_prompt("qwen3_vl_embedding", scheme="gen2embed")
    with pytest.raises(ValueError, match="no role suffixes"):
        get_prompt("qwen3_vl_embedding", query_suffix_text="\nOne word.")
    with pytest.raises(ValueError, match="unknown mode 'qwen3'"):
        get_prompt("hierarchical", mode="qwen3")
    from g2e_jax.models.llava_next.chat import LLAVA_NEXT_CHAT

    with pytest.raises(ValueError, match="llava_next chat format has no per-row system turn"):
        p.system_segment("query", LLAVA_NEXT_CHAT)


def test_pixel_bounds_override(tiny_dir):
    from g2e_jax.models.llava_next.images import LlavaImageConfig
    from g2e_jax.preprocess import Preprocessor, with_pixel_bounds

    base = Preprocessor.from_pretrained(tiny_dir)
    pre = Preprocessor.from_pretrained(tiny_dir, min_pixels=4096, max_pixels=9000)
    assert (pre.image_config.min_pixels, pre.image_config.max_pixels) == (4096, 9000)
    assert pre.image_config.patch_size == base.image_config.patch_size  # the rest from the file
    (row,) = pre.prepare([""], [random_image(300, 200, 5)], role="document")
    assert int(np.prod(row.grid_thw)) * 14 * 14 <= 9000
    with pytest.raises(ValueError, match="min_pixels .4096. > max_pixels .100."):
        Preprocessor.from_pretrained(tiny_dir, min_pixels=4096, max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels=-5: expected a positive number of pixels"):
        Preprocessor.from_pretrained(tiny_dir, max_pixels=-5)
    with pytest.raises(ValueError, match="the llava_next image processor has no pixel bounds"):
        with_pixel_bounds(LlavaImageConfig(), 4096, None, "llava_next")


@pytest.mark.parametrize("dim", [0, 65, -1, True, 8.0, "8"])
def test_dim_is_checked(jax_model, tiny_dir, dim):
    from g2e_jax.preprocess import Preprocessor

    pre = Preprocessor.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match=rf"dim={dim!r}: .* from 1 to the model's hidden size 64"):
        Embedder(jax_model, pre, dim=dim)


def test_job_configs_reach_the_embedder(tiny_dir):
    """configs/qwen3vl_embedding_eval.py and configs/embed.py's keys (prompt, dim, pixel bounds) as
    ``Embedder.from_config`` reads them."""
    from g2e_jax.config_utils import load_config

    cfg = load_config("configs/qwen3vl_embedding_eval.py", [f"model.path={tiny_dir}",
                      "model.dtype=float32", "max_len=512", "dim=16"])  # fmt: skip
    emb = Embedder.from_config(cfg)
    assert (emb.prompt.name, emb.prompt.scheme, emb.dim) == ("qwen3_vl_embedding", "mrope", 16)
    assert emb.prompt.row_system("query", None) == "Retrieve images or text relevant to the user's query."
    assert emb.prompt.row_system("document", None) == DEFAULT
    assert (emb.image_config.min_pixels, emb.image_config.max_pixels) == REFERENCE_PIXELS
    assert emb.encode(["a"], role="document").shape == (1, 16)
    hier = load_config("configs/qwen3vl_embedding_eval.py:hierarchical", [f"model.path={tiny_dir}"])
    assert (hier.prompt.preset, hier.prompt.scheme, hier.dim) == ("hierarchical", "gen2embed", None)
    embed = load_config("configs/embed.py", ["prompt.preset=qwen3_vl_embedding",
                        "prompt.scheme=mrope", "dim=8", "max_pixels=5000"])  # fmt: skip
    assert (embed.dim, embed.max_pixels, embed.min_pixels) == (8, 5000, None)
