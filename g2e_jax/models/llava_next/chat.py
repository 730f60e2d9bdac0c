"""LLaVA-NeXT's chat format for the hierarchical prompt, as the official code writes it:
``[INST] {system}\\n{text}{suffix} [/INST]``, ``<image>`` for MMEB's ``<|image_1|>``, the BOS token
that the processor's tokenizer adds by default, and the last token (``]``) pooled."""

from g2e_jax.prompts import ChatFormat

LLAVA_NEXT_CHAT = ChatFormat(
    name="llava_next",
    system_segment_format="<s>[INST] {system}",
    no_system_segment="<s>[INST]",
    assistant_header=" [/INST]",
    image_token="<image>",
    pad_token="<unk>",
)
