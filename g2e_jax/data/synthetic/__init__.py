"""Offline, seeded synthetic data in the benchmarks' own formats (MMEB, SugarCrepe, SugarCrepe++), all
drawn by one renderer (``shapes.render``), for the demo and the tests."""

from g2e_jax.data.synthetic.mmeb import MIN_IMAGE_SIZE, SyntheticData, generate_synthetic, make_synthetic
from g2e_jax.data.synthetic.mmeb_subsets import COUNT_WORDS, SUBSETS, TEMPLATES
from g2e_jax.data.synthetic.scenes import caption
from g2e_jax.data.synthetic.shapes import (
    COLORS,
    CROP_SIZE,
    SHAPES,
    Crop,
    Scene,
    Shape,
    crop_box,
    render,
    render_crop,
)
from g2e_jax.data.synthetic.sugarcrepe import make_synthetic_sugarcrepe, make_synthetic_sugarcrepe_pp

__all__ = [
    "COLORS", "COUNT_WORDS", "CROP_SIZE", "MIN_IMAGE_SIZE", "SHAPES", "SUBSETS", "TEMPLATES", "Crop", "Scene",
    "Shape", "SyntheticData", "caption", "crop_box", "generate_synthetic", "make_synthetic",
    "make_synthetic_sugarcrepe", "make_synthetic_sugarcrepe_pp", "render", "render_crop",
]  # fmt: skip
