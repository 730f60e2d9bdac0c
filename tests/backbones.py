"""The tests' table of backbones: one ``Spec`` per ``models.BACKBONES`` key, what the tests written once
over every backbone need to know about it (tests/test_backbones.py; ``hf_reference.load_hf_model``;
test_compare and test_attention for the commands a backbone supports).

A new backbone joins those tests by adding its entry to ``SPECS``; until it has one,
``test_backbones.py::test_every_backbone_has_a_spec`` fails. The reference side of each entry (prompt
strings, transformers calls, the official Gen2Embed template) is written here, never taken from the
code under test. torch and transformers are imported inside the functions: this module imports
without them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

# The paper's system prompt (the parity cases' system turn), written out here.
SYSTEM = "Given an image, summarize the provided image in one word."
QWEN_VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def random_image(height: int, width: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encode(processor, texts, images=None) -> dict[str, np.ndarray]:
    """The HF processor's batch (right padding), as numpy arrays."""
    out = processor(text=list(texts), images=images or None, padding=True, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def normalized_last(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The last real token's state of each row, L2-normalised (the official pooling)."""
    last = np.asarray(attention_mask).sum(-1) - 1
    pooled = hidden[np.arange(len(last)), last]
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


# --- Qwen2-VL and Qwen2.5-VL ---------------------------------------------------------------------------


def _qwen_prompt(user: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def _qwen_processor(path):
    from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

    return load_hf_processor(path)


def _qwen_hf_forward(hf_model, batch):
    """transformers' final hidden states at its own M-RoPE positions."""
    from hf_reference import hf_hidden_states, hf_rope_index

    return hf_hidden_states(hf_model, batch, hf_rope_index(hf_model, batch))


def _qwen_forward(model, batch):
    """Ours, eager, at the M-RoPE positions we derive (``rope_index``)."""
    from g2e_jax.models.qwen2_vl import rope_index

    positions = rope_index(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                           model.config, "mrope")  # fmt: skip
    return np.asarray(model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                            batch.get("image_grid_thw"), positions))  # fmt: skip


def _qwen_official(hf_model, processor, texts, images, role):
    """The official Gen2Embed path (gen2embed scheme): its template, the HF processor, transformers."""
    from hf_reference import OFFICIAL_SYSTEM, official_embeddings, official_template

    strings = [official_template(t, has_image=im is not None, role=role, system=OFFICIAL_SYSTEM, scheme="gen2embed")
               for t, im in zip(texts, images)]  # fmt: skip
    return official_embeddings(hf_model, processor, strings, images, scheme="gen2embed")


def _qwen2_vl_2b():
    """Qwen2-VL-2B's widths (its config.json), 1 decoder layer and 1 vision block."""
    from g2e_jax.models.qwen2_vl import Qwen2VLConfig, TextConfig, VisionConfig
    from g2e_jax.models.qwen2_vl.config import with_token_ids

    return with_token_ids(Qwen2VLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=1,
                        num_attention_heads=12, num_key_value_heads=2, mrope_section=(16, 24, 24), rope_theta=1e6),
        vision=VisionConfig(depth=1, embed_dim=1280, num_heads=16, mlp_ratio=4, out_hidden_size=1536),
        tie_word_embeddings=True,
    ))  # fmt: skip


def _qwen2_5_vl_3b():
    """Every width Qwen2.5-VL-3B's (``QWEN2_5_VL_3B``: vision 1280 wide, 16 heads of 80, SwiGLU 3420;
    decoder 2048 wide, 16 heads of 128, 2 KV heads, MLP 11008, M-RoPE sections 16/24/24) except the
    vocabulary, the tiny tokenizer's (a bigger table changes no arithmetic, only time and memory);
    1 decoder layer and 2 vision blocks, the first windowed (112-pixel windows: 8x8 patches), the
    second listed in ``fullatt_block_indexes``."""
    from g2e_jax.models.common.hf_files import special_token_ids
    from g2e_jax.models.qwen2_5_vl import QWEN2_5_VL_3B
    from g2e_jax.models.qwen2_vl.config import with_token_ids

    c, ids = QWEN2_5_VL_3B, special_token_ids()
    text = dataclasses.replace(c.text, num_hidden_layers=1, vocab_size=ids["vocab_size"], bos_token_id=None,
                               eos_token_id=ids["im_end"])  # fmt: skip
    vision = dataclasses.replace(c.vision, depth=2, fullatt_block_indexes=(1,))
    return with_token_ids(c.replace(text=text, vision=vision))


def _qwen2_5_vl_3b_batch(batch, cfg):
    # 12x18 patches (6x9 merged) span 2x3 windows of 8x8, none of the bottom or right ones whole.
    assert batch["image_grid_thw"].tolist() == [[1, 12, 18]]


def _qwen3_vl_2b():
    """Every width Qwen3-VL-2B-Instruct's (``QWEN3_VL_2B``: vision 1024 wide, 16 heads of 64, GELU-tanh MLP
    4096; decoder 2048 wide, 16 heads of 128 with q/k norms, 8 KV heads, MLP 6144, interleaved M-RoPE
    sections 24/20/20, rope theta 5e6) except the vocabulary, the tiny tokenizer's; 2 decoder layers and
    2 vision blocks, a DeepStack tap after block 0 (so decoder layer 1 gets no DeepStack feature)."""
    from g2e_jax.models.common.hf_files import special_token_ids
    from g2e_jax.models.qwen2_vl.config import with_token_ids
    from g2e_jax.models.qwen3_vl import QWEN3_VL_2B

    c, ids = QWEN3_VL_2B, special_token_ids()
    text = dataclasses.replace(c.text, num_hidden_layers=2, vocab_size=ids["vocab_size"], bos_token_id=None,
                               eos_token_id=ids["im_end"])  # fmt: skip
    vision = dataclasses.replace(c.vision, depth=2, deepstack_visual_indexes=(0,))
    return with_token_ids(c.replace(text=text, vision=vision))


def _qwen3_vl_2b_batch(batch, cfg):
    # 12x18 patches of 16 pixels: the 48x48 learned position table is sampled down.
    assert batch["image_grid_thw"].tolist() == [[1, 12, 18]]


# --- LLaVA-NeXT ------------------------------------------------------------------------------------------


def _llava_prompt(user: str) -> str:
    return f"[INST] {user} [/INST]"


def _llava_processor(path):
    from g2e_jax.models.llava_next.hf_files import load_hf_processor

    return load_hf_processor(path)


def _llava_hf_forward(hf_model, batch):
    import torch

    with torch.no_grad():
        return hf_model.model(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()


def _llava_forward(model, batch):
    """Ours, eager, from a processor batch (with or without images)."""
    if "pixel_values" not in batch:
        return np.asarray(model(batch["input_ids"], batch["attention_mask"]))
    return np.asarray(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            image_sizes=batch["image_sizes"]))  # fmt: skip


def official_llava_string(text: str, *, has_image: bool, role: str) -> str:
    """The official Gen2Embed LLaVA-NeXT string, written here by hand (plain formatting, as its
    ``Llava_NEXT_process_fn`` does): ``[INST] {system}\\n{text}{suffix} [/INST]``."""
    from hf_reference import OFFICIAL_SYSTEM

    text = text.replace("<|image_1|>", "<image>")
    if role == "query":
        suffix = "text/image" if has_image else "text"
        text += f"\nRepresent the given {suffix} in one word."
    return f"[INST] {OFFICIAL_SYSTEM}\n{text} [/INST]"


def _llava_official(hf_model, processor, texts, images, role):
    """The official path: the string above, the HF processor (BOS added), transformers, the last real
    token, L2 normalisation."""
    strings = [official_llava_string(t, has_image=im is not None, role=role) for t, im in zip(texts, images)]
    batch = encode(processor, strings, [im for im in images if im is not None])
    return normalized_last(_llava_hf_forward(hf_model, batch), batch["attention_mask"])


def _llava_v1_6_mistral_7b():
    """Every width ``LLAVA_V1_6_MISTRAL_7B``'s (CLIP-L/14 on 336-pixel tiles: 1024 wide, 16 heads, MLP
    4096, 24x24 patches; Mistral: 4096 wide, 32 heads of 128, 8 KV heads, MLP 14336, RoPE theta 1e6;
    the llava-v1.6 pinpoints) except the depths (1 decoder layer, 2 CLIP layers) and the vocabulary
    (the tiny tokenizer's)."""
    from g2e_jax.models.llava_next import LLAVA_V1_6_MISTRAL_7B
    from g2e_jax.models.llava_next.hf_files import special_token_ids

    c, ids = LLAVA_V1_6_MISTRAL_7B, special_token_ids()
    text = dataclasses.replace(c.text, num_hidden_layers=1, vocab_size=ids["vocab_size"], bos_token_id=ids["bos"],
                               eos_token_id=ids["eos"])  # fmt: skip
    return c.replace(text=text, vision=dataclasses.replace(c.vision, depth=2), image_token_id=ids["image"])


def _llava_7b_batch(batch, cfg):
    from g2e_jax.models.llava_next import anyres

    # 333 x 1001 selects the 1x3 grid of 336-pixel tiles, with rows cropped.
    assert anyres.tile_grid(333, 1001, cfg) == (1, 3)
    assert batch["image_sizes"].tolist() == [[333, 1001]]


@dataclass(frozen=True)
class Released:
    """A parity case at a released model's real widths (few layers, random weights)."""

    name: str
    config: Callable[[], Any]
    image: tuple[int, int]  # (height, width) of the case's image
    check: Callable[[dict, Any], None]  # (processor batch, config): what the image is meant to exercise


@dataclass(frozen=True)
class Spec:
    name: str  # for the test reports
    model_class: str  # ours: ``models.load`` dispatches on config.json's model_type to it
    hf_class: str  # transformers' class of the model directory
    image: str  # one image's placeholder in a user turn, as the HF processor expands it
    prompt: Callable[[str], str]  # user text -> the whole chat-formatted string
    load_processor: Callable[[Any], Any]  # model directory -> its HF processor
    hf_forward: Callable[[Any, dict], np.ndarray]  # (transformers model, batch) -> final hidden states
    forward: Callable[[Any, dict], np.ndarray]  # (our model, batch) -> final hidden states, eager
    official: Callable[..., np.ndarray]  # (hf_model, processor, texts, images, role) -> official embeddings
    released: Released
    # The adapter test_train_then_export_hf trains: between them the backbones cover both kinds' exports
    # (the merge and the PEFT writer are common code; the trainer's own run is DoRA on Qwen2-VL).
    adapter: str
    compare: bool  # `g2e-jax compare` has a transformers reference for it (test_compare)
    attention: bool  # analyze-attention is checked against transformers' eager attention (test_attention)


_QWEN = dict(image=QWEN_VISION, prompt=_qwen_prompt, load_processor=_qwen_processor, hf_forward=_qwen_hf_forward,
             forward=_qwen_forward, official=_qwen_official, compare=True, attention=True)  # fmt: skip

SPECS: dict[str, Spec] = {
    "qwen2_vl": Spec(
        name="Qwen2-VL", model_class="Qwen2VL", hf_class="Qwen2VLForConditionalGeneration", adapter="lora",
        released=Released("Qwen2-VL-2B widths, 1 layer + 1 vision block", _qwen2_vl_2b, (84, 112),
                          lambda batch, cfg: None),
        **_QWEN,
    ),
    "qwen2_5_vl": Spec(
        name="Qwen2.5-VL", model_class="Qwen2_5VL", hf_class="Qwen2_5_VLForConditionalGeneration", adapter="lora",
        released=Released("Qwen2.5-VL-3B widths, 1 layer + 2 vision blocks (windowed, full)", _qwen2_5_vl_3b,
                          (168, 252), _qwen2_5_vl_3b_batch),
        **_QWEN,
    ),
    "qwen3_vl": Spec(
        name="Qwen3-VL", model_class="Qwen3VL", hf_class="Qwen3VLForConditionalGeneration", adapter="dora",
        released=Released("Qwen3-VL-2B widths, 2 layers + 2 vision blocks (DeepStack tap after block 0)",
                          _qwen3_vl_2b, (192, 288), _qwen3_vl_2b_batch),
        **{**_QWEN, "compare": False, "attention": False},  # not yet in test_compare / test_attention
    ),
    "llava_next": Spec(
        name="LLaVA-NeXT", model_class="LlavaNext", hf_class="LlavaNextForConditionalGeneration", adapter="dora",
        image="<image>", prompt=_llava_prompt, load_processor=_llava_processor, hf_forward=_llava_hf_forward,
        forward=_llava_forward, official=_llava_official,
        released=Released("LLaVA-NeXT llava-v1.6-mistral-7b widths, 1 layer + 2 CLIP layers",
                          _llava_v1_6_mistral_7b, (333, 1001), _llava_7b_batch),
        # compare's reference (g2e_jax/compare/reference.py) and the attention test's eager-attention
        # reference know the Qwen families only.
        compare=False, attention=False,
    ),
}  # fmt: skip


def archs(feature: str | None = None) -> list[str]:
    """The model_types of ``models.BACKBONES`` (in its order) whose spec has ``feature`` true (all
    without one). A backbone without a spec is left to test_every_backbone_has_a_spec to report."""
    from g2e_jax.models import BACKBONES

    return [a for a in BACKBONES if a in SPECS and (feature is None or getattr(SPECS[a], feature))]
