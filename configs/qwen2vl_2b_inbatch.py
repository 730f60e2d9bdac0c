"""The paper's in-batch negative baseline on Qwen2-VL-2B
(values: configs/recipes.py, ``inbatch``).

``g2e-jax train --config configs/qwen2vl_2b_inbatch.py --workdir runs/inbatch_2b
--config.model.path=/models/Qwen2-VL-2B-Instruct --config.data.root=/data/MMEB-train
--config.data.image_dir=/data/MMEB-train/images`` (no mining). Plain MMEB-train rows of the
``original`` split, at most 100,000 per subset (``data.num_sample_per_subset``, chosen as the official
``shuffle(seed=42).select(range(n))``), drawn at random across subsets; the SaHa recipe's optimiser,
schedule, steps, adapters and encode settings (configs/qwen2vl_2b_saha.py). Like the official
command (``--per_device_train_batch_size 16`` without hard negatives) a batch holds 16 rows per device.
Evaluate with configs/mmeb_eval.py as for SaHa.
"""

from g2e_jax.config_utils import sibling_config


def get_config():
    return sibling_config(__file__, "recipes.py", "inbatch")
