"""The PyTorch (transformers) side of the parity tests."""

from __future__ import annotations

import numpy as np
import torch

# The official Gen2Embed system prompt (level 1), written here by hand: a reference is never taken from
# the code under test.
OFFICIAL_SYSTEM = (
    "Given an image, summarize the provided image in one word. Given only text, describe the text in one word."
)


def hf_model_class(path):
    """The transformers class of a model directory, by its config.json's model_type."""
    import json
    from pathlib import Path

    from transformers import (
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
               "llava_next": LlavaNextForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}  # fmt: skip
    return classes[json.loads((Path(path) / "config.json").read_text())["model_type"]]


def load_hf_model(path):
    model = hf_model_class(path).from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    return model.eval()


def hf_rope_index(hf_model, batch) -> np.ndarray:
    """transformers' own M-RoPE positions for a processor batch."""
    with torch.no_grad():
        pos, _ = hf_model.model.get_rope_index(
            torch.as_tensor(batch["input_ids"]),
            mm_token_type_ids=torch.as_tensor(batch["mm_token_type_ids"]),
            image_grid_thw=None
            if batch.get("image_grid_thw") is None
            else torch.as_tensor(batch["image_grid_thw"]),
            attention_mask=torch.as_tensor(batch["attention_mask"]),
        )
    return pos.numpy()


def sequential_positions(attention_mask) -> np.ndarray:
    """What Gen2Embed's transformers 4.46 computes for bare <|image_pad|> runs: 0..n-1 over real tokens."""
    mask = torch.as_tensor(attention_mask).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return pos[None].expand(3, -1, -1).numpy()


def hf_hidden_states(hf_model, batch, position_ids, output_hidden_states=False):
    kwargs = dict(
        input_ids=torch.as_tensor(batch["input_ids"]),
        attention_mask=torch.as_tensor(batch["attention_mask"]),
        position_ids=torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
        output_hidden_states=output_hidden_states,
    )
    if batch.get("pixel_values") is not None:
        kwargs.update(
            pixel_values=torch.as_tensor(batch["pixel_values"]),
            image_grid_thw=torch.as_tensor(batch["image_grid_thw"]),
            mm_token_type_ids=torch.as_tensor(batch["mm_token_type_ids"]),
        )
    with torch.no_grad():
        out = hf_model.model(**kwargs)
    if output_hidden_states:
        return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states]
    return out.last_hidden_state.numpy()


def official_template(text: str, *, has_image: bool, role: str, system: str | None, scheme: str) -> str:
    """The official Gen2Embed string for one row (plain string formatting, as its process_fn does)."""
    image = "<|image_pad|>" if scheme == "gen2embed" else "<|vision_start|><|image_pad|><|vision_end|>"
    text = text.replace("<|image_1|>", image)
    if role == "query":
        text += (
            "\nRepresent the given text/image in one word."
            if has_image
            else "\nRepresent the given text in one word."
        )
    if system is not None:
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def official_embeddings(hf_model, processor, strings, images, *, scheme: str) -> np.ndarray:
    """Full template strings -> HF processor -> transformers -> last real token -> L2 normalise."""
    present = [im for im in images if im is not None]
    batch = processor(text=list(strings), images=present or None, padding=True, return_tensors="np")
    batch = {k: np.asarray(v) for k, v in batch.items()}
    if scheme == "gen2embed":
        positions = sequential_positions(batch["attention_mask"])
    else:
        positions = hf_rope_index(hf_model, batch)
    hidden = hf_hidden_states(hf_model, batch, positions)
    last = batch["attention_mask"].sum(-1) - 1
    pooled = torch.as_tensor(hidden[np.arange(len(last)), last])
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def perturb_adapters(wrapped, seed: int):
    """Random non-zero PEFT adapters in place (A, B ~ 0.05 N(0, 1); DoRA magnitudes scaled by
    1 + 0.2 N(0, 1)), drawn from torch's generator seeded ``seed``: B = 0 would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else 0.05 * noise)
    return wrapped
