"""LLaVA-NeXT's chat format for the hierarchical prompt, as the official code writes it:
``[INST] {system}\\n{text}{suffix} [/INST]``, ``<image>`` for MMEB's ``<|image_1|>``, the BOS token
that the processor's tokenizer adds by default, and the last token (``]``) pooled.

The constant segment is ``<s>[INST]`` only: the system text ends in punctuation, which a byte-level
BPE joins with the following ``\\n`` (``.\\n`` is one token), so it is tokenised with the row. Without a
system text the row is ``<s>[INST] {text}{suffix} [/INST]``.
"""

from g2e_jax.prompts import ChatFormat

LLAVA_NEXT_CHAT = ChatFormat(
    name="llava_next",
    system_segment_format="<s>[INST]",
    no_system_segment="<s>[INST]",
    user_segment_format=" {system}\n{user}",
    no_system_user_segment=" {user}",
    assistant_header=" [/INST]",
    image_token="<image>",
    pad_token="<unk>",
)
