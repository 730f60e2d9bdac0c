"""Adapters below both the Embedder and the trainer: LoRA/DoRA layers (``lora``), PEFT adapter folders
in and out (``peft``), and a ``g2e-jax train`` workdir loaded as a model (``trained``).

``g2e_jax.embed`` and ``g2e_jax.train`` both import from here; nothing here imports either of them.
"""
