"""llava-hf/llava-v1.6-mistral-7b-hf (``--config.model.path=/models/llava-v1.6-mistral-7b-hf``), the official
code's third backbone: the recipes of configs/qwen2_5vl_3b.py (``:zero_shot``, ``:plain``, ``:filtered``,
``:inbatch``; SaHa by default) on LLaVA-NeXT. The backbone is read from config.json (``llava_next``): its
chat format (``[INST] {system}\\n{text}{suffix} [/INST]``), CLIP-L/336 anyres tiles and Mistral decoder
(4096 wide, 32 layers, GQA 32/8; ``g2e_jax.models.llava_next.LLAVA_V1_6_MISTRAL_7B``).

An image costs up to 5 tiles and ~2,900 tokens here (576 for the base tile, up to 48x48 + 48 newlines
for a 672 x 672 grid), so the sequence limits are raised to 4096; the scheme is ``gen2embed`` (the
``<image>`` placeholder and 1-D positions: LLaVA-NeXT has no M-RoPE). The 15 GB of bf16 weights fit
replicated on 80 GB devices; shard them with ``--config.mesh.fsdp=8`` on smaller ones.
"""

from g2e_jax.config_utils import sibling_config

MAX_LEN = 4096


def get_config(preset: str = "saha"):
    c = sibling_config(__file__, "recipes.py", preset)
    if "max_len" in c:
        c.max_len = MAX_LEN
    if "mine" in c and "max_len" in c.mine:
        c.mine.max_len = MAX_LEN
    if "train" in c and "users" in c.train:
        c.train.users = MAX_LEN - 64  # the template: <s>[INST] and [/INST]
    return c
