"""SugarCrepe and SugarCrepe++: ``g2e-jax eval-sugarcrepe --config configs/sugarcrepe.py
--config.model.path=DIR --config.data.dir=sugarcrepe --config.data.image_dir=val2017 --config.output_dir=OUT``
(``g2e-jax eval-sugarcrepe-pp`` with the same fields for SugarCrepe++).

Fields (see ``g2e_jax.eval.compositional.sugarcrepe_config``): model.path / dtype, prompt.preset /
scheme / query_system / document_system, data.dir (one ``<subset>.json`` per subset), data.image_dir,
subsets (empty: all of the benchmark's), output_dir, max_len, image_resolution, batch_size.
"""

from g2e_jax.eval.compositional import sugarcrepe_config


def get_config():
    return sugarcrepe_config()
