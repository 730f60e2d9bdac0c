"""``g2e-jax export-hf``: a trained run -> a merged model in HF layout, or its adapters as a PEFT folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from g2e_jax.adapters.peft import save_peft_adapter
from g2e_jax.checkpoints import load_trained
from g2e_jax.models import save

# The non-weight files of a HF model directory that an export carries over.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",  # LLaVA-NeXT's processor settings (patch_size, feature strategy)
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",  # sentencepiece tokenizers (Llama / Mistral)
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
FORMATS = ("merged", "peft")


def export_hf(
    workdir: str | Path, output: str | Path, *, step: int | None = None, format: str = "merged"
) -> Path:
    """``merged``: adapters folded in, saved in HF layout with the base model's tokenizer and processor
    files. ``peft``: the unmerged LoRA/DoRA adapters as a PEFT folder for ``PeftModel.from_pretrained``
    on the base model (``base_model_name_or_path`` is its absolute path)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {FORMATS}")
    model, base, _ = load_trained(workdir, step=step, merge=format == "merged")
    output = Path(output)
    if format == "peft":
        return save_peft_adapter(model, output, base_model=base)
    save(model, output, progress=False)
    for name in PROCESSOR_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, output / name)
    return output
