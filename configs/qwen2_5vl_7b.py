"""Qwen2.5-VL-7B-Instruct (``--config.model.path=/models/Qwen2.5-VL-7B-Instruct``): the recipes of
configs/qwen2_5vl_3b.py (``:zero_shot``, ``:plain``, ``:filtered``, ``:inbatch``; SaHa by default)
with the 7B weights. With 8 devices of 80 GB the 16 GB of bf16 weights fit replicated; on smaller
devices shard them with ``--config.mesh.fsdp=8``.
"""

from g2e_jax.config_utils import sibling_config


def get_config(preset: str = "saha"):
    return sibling_config(__file__, "recipes.py", preset)
