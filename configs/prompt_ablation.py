"""The paper's prompt ablation on MMEB: ``g2e-jax eval-prompts --config configs/prompt_ablation.py
--config.model.path=DIR --config.data.root=MMEB-eval --config.data.image_dir=eval_images --config.output_dir=OUT``.

Every field of configs/mmeb_eval.py, plus ``presets`` (default: plain, system_only, suffix_only,
hierarchical; also default_system and no_one_word, see ``g2e_jax.prompts.PRESETS``), e.g.
``--config.presets="('plain', 'hierarchical', 'no_one_word')"``. One results.md with a column per preset.
Each preset also runs alone as ``g2e-jax eval --config configs/mmeb_eval.py:<preset>``.
"""

from g2e_jax.eval.prompt_sweep import sweep_config


def get_config():
    return sweep_config()
