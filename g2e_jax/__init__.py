"""g2e_jax: a generative multimodal LLM as a universal multimodal embedding model (JAX/Flax)."""

__version__ = "0.1.0"
