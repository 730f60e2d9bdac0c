"""SaHa on Qwen2-VL-7B: the recipes of configs/qwen2vl_2b_saha.py (SaHa by default; ``:filtered``,
``:inbatch``, ``:zero_shot``, ``:plain``) with the 7B weights
(``--config.model.path=/models/Qwen2-VL-7B-Instruct``).
With 8 devices of 80 GB, the 15 GB of bf16 weights fit replicated; on smaller devices shard them with
``--config.mesh.fsdp=8``.
"""

from g2e_jax.train.trainer import backbone_recipe


def get_config(preset: str = "saha"):
    return backbone_recipe(preset)
