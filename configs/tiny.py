"""Fine-tuning the tiny model on the synthetic set: the demo's and the tests' training config.

``g2e-jax train --config configs/tiny.py --workdir runs/tiny --config.model.path=DIR
--config.data.clusters_dir=MINED --config.data.image_dir=SYNTHETIC/images``
(values: ``g2e_jax.demo.tiny_training_config``).
"""

from g2e_jax.demo import tiny_training_config


def get_config():
    return tiny_training_config()
