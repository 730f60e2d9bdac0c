"""g2e_jax: a generative multimodal LLM as a universal multimodal embedding model (JAX/Flax)."""

__version__ = "0.1.0"
__all__ = ["Embedder"]


def __getattr__(name):
    # Lazy, so that `g2e-jax --help` and light imports do not pay for JAX start-up.
    if name == "Embedder":
        from g2e_jax.embed import Embedder

        return Embedder
    raise AttributeError(f"module 'g2e_jax' has no attribute {name!r}")
