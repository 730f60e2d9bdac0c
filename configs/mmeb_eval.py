"""Zero-shot MMEB evaluation: ``g2e-jax eval --config configs/mmeb_eval.py --config.model.path=DIR
--config.data.root=MMEB-eval --config.data.image_dir=eval_images --config.output_dir=OUT``.

``configs/mmeb_eval.py:plain`` selects the paper's plain-prompt baseline. Fields (see
``g2e_jax.eval.mmeb.eval_config``): model, prompt, data.root / image_dir / groups_file, subsets
(default: every subset of the groups table: the 36 MMEB subsets, or those of data.groups_file), output_dir,
cache_dir, max_len, image_resolution, batch_size.
"""

from g2e_jax.eval.mmeb import eval_config


def get_config(preset: str = "hierarchical"):
    return eval_config(preset)
