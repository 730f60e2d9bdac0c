"""Moved to ``g2e_jax.adapters.lora`` (below both embed and train). This alias only keeps code written
against the old path importing while concurrent branches are merged; delete it once nothing imports it."""

import sys

from g2e_jax.adapters import lora

sys.modules[__name__] = lora
