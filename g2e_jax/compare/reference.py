"""The PyTorch side of ``g2e-jax compare``: the official Gen2Embed encode path, rebuilt on its own.

A second opinion only counts if it shares nothing with what it checks, so nothing here imports
g2e_jax's prompt or preprocessing code. Per row, as the official ``EvalDataset`` /
``Qwen2_VL_process_fn`` / ``MMEBModel`` do:

1. the text with MMEB's ``<|image_1|>`` replaced by the backbone's image token, on the query side
   followed by ``\\nRepresent the given text[/image] in one word.``, wrapped in the Qwen2 chat
   template by plain string formatting (one f-string, system turn optional);
2. the image opened with PIL and optionally pre-resized (the official ``process_image`` modes);
3. the Hugging Face processor on that one row (``max_length``, ``truncation``), then the
   tokenizer's ``pad`` over the batch;
4. the transformers model's final hidden state (after the final norm) at the last real token,
   L2-normalised in the model's dtype, then float32.

Positions: the official transformers 4.46 rope index only finds images after ``<|vision_start|>``,
so its bare ``<|image_pad|>`` runs get plain sequential positions (``gen2embed``); ``mrope`` uses the
tagged placeholder and transformers' own ``get_rope_index``. A row with an image but no marker gets
the placeholder first (MMEB's image-first convention; the official code would fail on such a row).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

# The paper's task-agnostic system prompt and the query suffixes (the official run passes the
# former as --Q_prompt/--D_prompt; Qwen2_VL_process_fn appends the latter for role 'Q').
OFFICIAL_SYSTEM = "Given an image, summarize the provided image in one word. Given only text, describe the text in one word."
SUFFIX_IMAGE = "\nRepresent the given text/image in one word."
SUFFIX_TEXT = "\nRepresent the given text in one word."
MMEB_IMAGE_TOKEN = "<|image_1|>"
IMAGE_TOKEN = {"gen2embed": "<|image_pad|>", "mrope": "<|vision_start|><|image_pad|><|vision_end|>"}
# The official process_image: square pre-resizes (PIL's default filter) and an aspect-adaptive default.
SQUARE_SIDES = {"low": 128, "clip": 336, "mid_low": 448, "mid": 672, "mid_high": 768, "high": 1344}
INSTALL_TORCH = 'pip install torch==2.13.0 && pip install -e ".[torch]"'


class TorchMissing(ImportError):
    """Live mode without PyTorch; the message names the install command."""


def require_torch():
    """``torch``, or TorchMissing naming the install command."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise TorchMissing(
            f"live mode runs the PyTorch reference and needs torch ({e}); install it with: {INSTALL_TORCH}"
        ) from None
    return torch


@dataclasses.dataclass(frozen=True)
class OfficialPrompt:
    """What decides the official strings: the system text per side, the query suffix, the scheme."""

    query_system: str | None = OFFICIAL_SYSTEM  # None: no system turn
    document_system: str | None = OFFICIAL_SYSTEM
    query_suffix: bool = True  # False for the paper's plain-prompt baseline
    scheme: str = "gen2embed"

    def __post_init__(self):
        if self.scheme not in IMAGE_TOKEN:
            raise ValueError(f"unknown scheme {self.scheme!r}; expected one of {tuple(IMAGE_TOKEN)}")

    @staticmethod
    def uses_query_template(role: str, subset: str | None) -> bool:
        """The official EvalDataset: the query side, and the candidates of 'matching' subsets."""
        return role == "query" or (subset is not None and "matching" in subset.lower())

    def string(self, text: str, has_image: bool, *, query_template: bool) -> str:
        """The whole string the official collator hands the processor for one row."""
        image = IMAGE_TOKEN[self.scheme]
        if MMEB_IMAGE_TOKEN in text:
            if not has_image:
                raise ValueError(f"the text has an {MMEB_IMAGE_TOKEN} marker but the row has no image")
            text = text.replace(MMEB_IMAGE_TOKEN, image)
        elif has_image:
            text = image + text
        if query_template and self.query_suffix:
            text += SUFFIX_IMAGE if has_image else SUFFIX_TEXT
        system = self.query_system if query_template else self.document_system
        if system is None:
            return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def official_prompt(preset: str, scheme: str, query_system=None, document_system=None) -> OfficialPrompt:
    """The official strings for a g2e_jax prompt preset (given by name only, never by its text)."""
    if preset == "hierarchical":
        default, suffix = OFFICIAL_SYSTEM, True
    elif preset == "plain":
        default, suffix = None, False
    else:
        raise ValueError(f"compare knows the presets 'hierarchical' and 'plain', got {preset!r}")
    return OfficialPrompt(
        query_system=default if query_system is None else query_system,
        document_system=default if document_system is None else document_system,
        query_suffix=suffix,
        scheme=scheme,
    )


def official_resize(image, resolution: str | None):
    """The official ``process_image`` pre-resize (None: the image as it is)."""
    from PIL import Image

    if resolution is None:
        return image
    if resolution in SQUARE_SIDES:
        side = SQUARE_SIDES[resolution]
        return image.resize((side, side))
    if resolution != "random":
        raise ValueError(f"unknown image resolution {resolution!r}")
    w, h = image.size
    if max(w, h) > 2 * min(w, h):  # stretch the short side to half the long one
        w, h = (w, w / 2) if w > h else (h / 2, h)
    scale = 1.0
    if max(w, h) > 992:
        scale = 992 / max(w, h)
    if min(w, h) < 336:
        scale = 336 / min(w, h)
    return image.resize((int(w * scale), int(h * scale)), Image.LANCZOS)


def torch_dtype(name: str):
    torch = require_torch()
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"reference dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


class TorchReference:
    """A transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL model and its processor, encoding as the official code does."""

    def __init__(
        self,
        path,
        *,
        prompt: OfficialPrompt,
        dtype: str = "float32",
        device: str = "auto",
        adapter=None,
        max_len: int | None = None,
        image_resolution: str | None = None,
        batch_size: int = 8,
    ):
        torch = require_torch()
        from transformers import (
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLForConditionalGeneration,
            Qwen3VLForConditionalGeneration,
        )

        from g2e_jax.models.qwen2_vl.hf_files import load_hf_processor

        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (a Hugging Face model directory is needed)")
        model_type = json.loads(config_file.read_text()).get("model_type")
        classes = {
            "qwen2_vl": Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
            "qwen3_vl": Qwen3VLForConditionalGeneration,  # the same processor and chat, with patch 16
        }
        if model_type not in classes:
            raise ValueError(
                f"{config_file}: model_type {model_type!r}; the reference knows {sorted(classes)}"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = classes[model_type].from_pretrained(
            path, dtype=torch_dtype(dtype), attn_implementation="sdpa", local_files_only=True
        )
        if adapter is not None:  # the official MMEBModel.load: PEFT adapter merged into the base
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        self.torch, self.model = torch, model.to(device).eval()
        self.processor = load_hf_processor(path)
        self.prompt, self.dtype, self.device = prompt, dtype, device
        self.max_len, self.image_resolution, self.batch_size = max_len, image_resolution, batch_size

    def encode(
        self, texts, images, *, query_template: bool, progress: bool = True, desc: str = ""
    ) -> np.ndarray:
        """``[N, D]`` float32 embeddings; ``images[i]`` is a path or None."""
        images = [None] * len(texts) if images is None else list(images)
        out = []
        bar = tqdm(total=len(texts), desc=desc or "PyTorch reference", unit="row", disable=not progress)
        for start in range(0, len(texts), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(texts)))
            out.append(
                self._batch([texts[i] for i in rows], [images[i] for i in rows], query_template, start)
            )
            bar.update(len(rows))
        bar.close()
        return (
            np.concatenate(out)
            if out
            else np.zeros((0, self.model.config.text_config.hidden_size), np.float32)
        )

    def _row(self, text, image, query_template, index):
        try:
            string = self.prompt.string(text, image is not None, query_template=query_template)
        except ValueError as e:
            raise ValueError(f"row {index}: {e}") from None
        pil = None
        if image is not None:
            from PIL import Image

            try:
                with Image.open(image) as opened:
                    opened.load()
                    pil = official_resize(opened.copy(), self.image_resolution)
            except OSError as e:
                raise ValueError(f"row {index}, image {image}: cannot read it ({e})") from None
        kwargs = {"max_length": self.max_len, "truncation": True} if self.max_len else {}
        try:
            return self.processor(
                text=[string], images=None if pil is None else [pil], return_tensors="np", **kwargs
            )
        except ValueError as e:  # e.g. truncation through an image
            raise ValueError(f"row {index}: the Hugging Face processor refused it ({e})") from None

    def _batch(self, texts, images, query_template, start) -> np.ndarray:
        torch = self.torch
        rows = [self._row(t, im, query_template, start + k) for k, (t, im) in enumerate(zip(texts, images))]
        padded = self.processor.tokenizer.pad(
            {"input_ids": [r["input_ids"][0].tolist() for r in rows]}, return_tensors="np"
        )
        ids, mask = np.asarray(padded["input_ids"]), np.asarray(padded["attention_mask"])
        config = self.model.config
        with_image = [r for r in rows if "pixel_values" in r]
        kwargs = {}
        if with_image:
            kwargs = {
                "pixel_values": torch.as_tensor(np.concatenate([r["pixel_values"] for r in with_image])),
                "image_grid_thw": torch.as_tensor(np.concatenate([r["image_grid_thw"] for r in with_image])),
                "mm_token_type_ids": torch.as_tensor((ids == config.image_token_id).astype(np.int64)),
            }
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
        if self.prompt.scheme == "gen2embed":  # transformers 4.46 on bare pads: 0..n-1 over real tokens
            seq = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
            positions = torch.as_tensor(np.broadcast_to(seq[None], (3, *seq.shape)).copy())
        else:
            positions, _ = self.model.model.get_rope_index(
                ids_t,
                mm_token_type_ids=kwargs.get("mm_token_type_ids", torch.zeros_like(ids_t)),
                image_grid_thw=kwargs.get("image_grid_thw"),
                attention_mask=mask_t,
            )
        device = self.model.device
        with torch.inference_mode():
            hidden = self.model.model(
                input_ids=ids_t.to(device),
                attention_mask=mask_t.to(device),
                position_ids=positions.to(device),
                **{k: v.to(device) for k, v in kwargs.items()},
            ).last_hidden_state
            last = (
                mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
            )  # last real token, either padding side
            pooled = hidden[torch.arange(len(rows)), torch.as_tensor(last).to(device)]
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.float().cpu().numpy()
