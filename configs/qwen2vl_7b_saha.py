"""SaHa on Qwen2-VL-7B: the recipes of configs/qwen2vl_2b_saha.py (SaHa by default; ``:filtered``,
``:inbatch``, ``:zero_shot``, ``:plain``) with the 7B weights
(``--config.model.path=/models/Qwen2-VL-7B-Instruct``).
With 8 devices of 80 GB, the 15 GB of bf16 weights fit replicated; on smaller devices shard them with
``--config.mesh.fsdp=8``. The step's activations are the larger part: compiled for 8 simulated CPU devices
with ``mesh.fsdp=8`` (``tests/sharding_checks.py --full``) it needs 175.5 GiB per device, and 94.8 GiB with
``--config.train.remat=layers`` (each decoder layer and vision block recomputed in the backward pass), of
which about 75 GiB are float32 copies of bf16 weights that the CPU backend makes for its matmuls. A GPU
keeps bf16 matmuls in bf16; its figure is not measured yet: ``g2e-jax train`` prints the compiled step's
need against the device before step 1 and stops if it does not fit (add ``train.remat=layers`` then).
"""

from g2e_jax.config_utils import sibling_config


def get_config(preset: str = "saha"):
    return sibling_config(__file__, "recipes.py", preset)
