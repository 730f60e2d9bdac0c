"""SaHa on Qwen2-VL-7B: the recipes of configs/qwen2vl_2b_saha.py (SaHa by default; ``:filtered``,
``:inbatch``, ``:zero_shot``, ``:plain``) with the 7B weights
(``--config.model.path=/models/Qwen2-VL-7B-Instruct``).
With 8 devices of 80 GB, the 15 GB of bf16 weights fit replicated; on smaller devices shard them with
``--config.mesh.fsdp=8``. The step's activations are the larger part: compiled for 8 simulated CPU devices
with ``mesh.fsdp=8`` (``tests/sharding_checks.py --full``, scanned layers, 2026-12-07) it needs 27.3 GiB
per device with ``--config.train.remat=layers`` (each decoder layer and vision block recomputed in the
backward pass), and 373.2 GiB without it (each layer's matmul outputs kept for the backward): use
``train.remat=layers`` at this depth. A GPU
keeps bf16 matmuls in bf16; its figure is not measured yet: ``g2e-jax train`` prints the compiled step's
need against the device before step 1 and stops if it does not fit (add ``train.remat=layers`` then).
"""

from g2e_jax.config_utils import sibling_config


def get_config(preset: str = "saha"):
    return sibling_config(__file__, "recipes.py", preset)
