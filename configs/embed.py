"""Export embeddings with ``g2e-jax embed --config configs/embed.py --input rows.jsonl --output DIR``.

Fields (see ``g2e_jax.export.embed_config``): model.path / model.dtype, prompt.preset / scheme /
query_system / document_system, instruction, subset, max_len, image_resolution, batch_size,
shard_size. Override any of them, e.g. ``--config.model.path=/models/Qwen2-VL-2B-Instruct
--config.model.dtype=bfloat16 --config.prompt.preset=plain``.
"""

from g2e_jax.export import embed_config


def get_config():
    return embed_config()
