"""SaHa on Qwen2-VL-2B: the paper's reference run (values: ``g2e_jax.train.trainer.saha_reference_config``).

1. Mine: ``g2e-jax mine --config configs/qwen2vl_2b_saha.py --config.model.path=/models/Qwen2-VL-2B-Instruct
   --config.data.root=/data/MMEB-train --config.data.image_dir=/data/MMEB-train/images
   --config.mine.output_dir=runs/saha_2b/mined``
2. Train: ``g2e-jax train --config configs/qwen2vl_2b_saha.py --workdir runs/saha_2b
   --config.model.path=... --config.data.clusters_dir=runs/saha_2b/mined --config.data.image_dir=...``

Reference hyper-parameters: DoRA r=8 (alpha 64, dropout 0.1, Gaussian init) on the decoder's
q/k/v/o and down projections; lr 5e-5, linear, 100 warm-up steps, 1,500 steps; 16 clusters
(<= 256 pairs) per device on 8 devices; GradCache chunks of 4; 448 x 448 images; max length 1024; bf16.
"""

from g2e_jax.train.trainer import saha_reference_config


def get_config():
    return saha_reference_config()
