"""MMEB evaluation of the released Qwen3-VL-Embedding checkpoints (2B, 8B) in their own format:
``g2e-jax eval --config configs/qwen3vl_embedding_eval.py --config.model.path=/models/Qwen3-VL-Embedding-2B
--config.data.root=/data/MMEB-eval --config.data.image_dir=... --config.output_dir=runs/q3emb_2b``.

The prompt is the ``qwen3_vl_embedding`` preset (``g2e_jax.prompts``: the instruction as the system
turn, image then text, the model's own M-RoPE positions, the last token pooled), as in the reference
``Qwen3VLEmbedder``; its MMEB evaluation gives queries the task instruction and candidates the default
"Represent the user's input.". MMEB rows here carry their task instruction inside the query text
(e.g. "Represent the given image with the following question: ..."), which stays in the user turn;
the queries' system turn is ``prompt.query_system``, by default the retrieval instruction of the
reference README's example. The reference's own MMEB-V2 loaders (which split a per-dataset instruction
out of the text) are not public in a form this repository reads, so its published scores are the
comparison, not a parity target. Other settings from the reference embedder: max length 8192, images
at their own size within its pixel bounds (4,096 to 1,843,200 pixels, not the checkpoint's
preprocessor_config.json's; no pre-resize), bf16 (the released dtype).

``:hierarchical`` evaluates the same weights with the paper's hierarchical prompt (``gen2embed``).
``--config.dim=N`` keeps the first N coordinates (Matryoshka), re-normalised.
"""

from g2e_jax.eval.mmeb import eval_config

QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."


def get_config(prompt: str = "qwen3_vl_embedding"):
    if prompt not in ("qwen3_vl_embedding", "hierarchical"):
        raise ValueError(f"unknown variant {prompt!r}; expected qwen3_vl_embedding or hierarchical")
    c = eval_config(prompt)
    c.model.dtype = "bfloat16"
    c.image_resolution = None
    if prompt == "qwen3_vl_embedding":
        c.prompt.query_system = QUERY_INSTRUCTION
        c.max_len = 8192
        c.min_pixels, c.max_pixels = 4096, 1843200
    return c
