"""``g2e-jax compare --config configs/compare.py --config.model.path=DIR ...`` (see README, "Compare with
PyTorch"). Fields (see ``g2e_jax.compare.compare_config``): model.path / dtype / adapter, prompt,
reference.dtype / device, data.root / image_dir / subsets, subset, limit, max_len, image_resolution,
batch_size, timing_repeats, matmul_precision, worst.
"""

from g2e_jax.compare import compare_config


def get_config():
    return compare_config()
