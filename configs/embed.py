"""Export embeddings with ``g2e-jax embed --config configs/embed.py --input rows.jsonl --output DIR``.

Fields (see ``g2e_jax.export.embed_config``): model.path / model.dtype, prompt.preset / scheme /
query_system / document_system, instruction, subset, max_len, dim, min_pixels / max_pixels,
image_resolution, batch_size, shard_size. Override any of them, e.g.
``--config.model.path=/models/Qwen2-VL-2B-Instruct --config.model.dtype=bfloat16 --config.prompt.preset=plain``.
A Qwen3-VL-Embedding checkpoint in its own format: ``--config.prompt.preset=qwen3_vl_embedding
--config.prompt.scheme=mrope --config.dim=1024 --config.min_pixels=4096 --config.max_pixels=1843200``
(``--config.instruction=...``: the system turn).
"""

from g2e_jax.export import embed_config


def get_config():
    return embed_config()
