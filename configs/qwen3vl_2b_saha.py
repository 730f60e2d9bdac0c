"""SaHa on Qwen3-VL-2B-Instruct (``--config.model.path=/models/Qwen3-VL-2B-Instruct``): the paper's recipe
(configs/recipes.py, the same values as configs/qwen2vl_2b_saha.py) on the fourth backbone, read from
config.json (``qwen3_vl``: DeepStack, q/k norms, interleaved M-RoPE; DESIGN.md §6).

1. Mine: ``g2e-jax mine --config configs/qwen3vl_2b_saha.py --config.model.path=/models/Qwen3-VL-2B-Instruct
   --config.data.root=/data/MMEB-train --config.data.image_dir=/data/MMEB-train/images
   --config.mine.output_dir=runs/saha_q3_2b/mined``
2. Train: ``g2e-jax train --config configs/qwen3vl_2b_saha.py --workdir runs/saha_q3_2b
   --config.model.path=... --config.data.clusters_dir=runs/saha_q3_2b/mined --config.data.image_dir=...``
3. Evaluate: ``g2e-jax eval --config configs/qwen3vl_2b_saha.py:zero_shot --config.model.path=...``
   (``:plain`` for the plain-prompt baseline).

The recipe is unchanged: DoRA r=8 (alpha 64, dropout 0.1) on the decoder's q/k/v/o and down projections,
lr 5e-5 linear with 100 warm-up steps, 1,500 steps, 16 clusters per device on 8 devices mixed across
subsets, GradCache chunks of 4, 448 x 448 images, max length 1024, bf16, the hierarchical prompt with
the ``gen2embed`` scheme. Qwen3-VL's 16-pixel patches merged 2 x 2 make a 448 x 448 image 196 tokens
(Qwen2-VL's 14-pixel ones: 256), so the same max length holds more text. The 4.3 GB of bf16 weights
fit replicated on every device. ``:filtered`` (in-step false-negative filters), ``:inbatch`` (plain rows).
"""

from g2e_jax.config_utils import sibling_config


def get_config(preset: str = "saha"):
    return sibling_config(__file__, "recipes.py", preset)
