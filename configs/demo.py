"""``g2e-jax demo``: sizes of the synthetic sets and encode settings (see ``g2e_jax.demo.demo_config``)."""

from g2e_jax.demo import demo_config


def get_config():
    return demo_config()
