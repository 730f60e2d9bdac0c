"""Where the embedding token looks: the official attention analysis (``notebooks/attention_analysis.ipynb``)
as a function and as ``g2e-jax analyze-attention``.

A row in its template is cut into three segments of key tokens: **system** (every token up to and
including the user header ``<|im_start|>user\\n``; the header's newline is the user segment's first
token), **image** (the ``<|image_pad|>`` tokens) and **user** (every other token after the system
segment, the assistant header included). Per decoder layer, with the attention probabilities
averaged over heads:

- ``lambda[l, s]``: the attention mass segment ``s`` receives, summed over every query token and the
  segment's key tokens (the notebook's lambda; a layer's three values sum to the row's length);
- ``efficiency[l, s] = lambda[l, s] / length[s]`` (the notebook's eff; 0 for an empty segment);
- ``last_token[l, s]``: the same sums for the pooled token's own attention row (they sum to 1).

The analysis runs the whole sequence, system segment included (never the prefix cache).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_dict
from tqdm.auto import tqdm

from g2e_jax import plots
from g2e_jax.config_sections import model_section, prompt_section
from g2e_jax.io import write_atomic
from g2e_jax.preprocess import bucket, collate

SEGMENTS = ("system", "image", "user")


def attention_profile(embedder, text: str, image=None, role: str = "query") -> dict[str, np.ndarray]:
    """``{"lambda", "efficiency", "last_token"}`` (each ``[layers, 3]``, columns system, image, user)
    and ``"lengths"`` (``[3]``) of one row, encoded as ``embedder.encode`` would encode it."""
    pre = embedder.preprocessor
    (row,) = pre.prepare([text], [image], role=role, progress=False)
    sys_ids, header_ids = pre.system_ids(role), pre.header_ids
    n_sys, n_user, n_head = len(sys_ids), len(row.user_ids), len(header_ids)
    # Segment of every token the program runs: system ids + the header's "\n" | user ids | header.
    segment = np.full(n_sys + bucket(n_user, embedder.seq_bucket_base) + n_head, -1, np.int32)
    segment[: n_sys + n_user + n_head] = 2
    segment[: n_sys + 1] = 0
    segment[n_sys : n_sys + n_user][row.user_ids == pre.image_pad_id] = 1
    patches = None if row.patches is None else bucket(len(row.patches), embedder.patch_bucket_base)
    arrays = collate(
        [row],
        batch_size=1,
        users=len(segment) - n_sys - n_head,
        patches=patches,
        images=None if patches is None else 1,
        pad_id=pre.pad_id,
        patch_dim=embedder.config.vision.patch_dim,
        pixel_dtype=embedder.dtype,
    )
    lam, last = _profile_program(embedder.graphdef)(
        embedder.state,
        jnp.asarray(sys_ids),
        jnp.asarray(header_ids),
        jnp.asarray(segment),
        **arrays,
        scheme=pre.prompt.scheme,
        pad_id=pre.pad_id,
        max_patches_per_image=patches,
    )
    lam, last = np.asarray(lam, np.float64), np.asarray(last, np.float64)
    lengths = np.bincount(segment[segment >= 0], minlength=3)
    efficiency = np.divide(lam, lengths, out=np.zeros_like(lam), where=lengths > 0)
    return {"lambda": lam, "efficiency": efficiency, "last_token": last, "lengths": lengths}


@functools.lru_cache(maxsize=4)
def _profile_program(graphdef):
    """The jitted analysis of one graph: per layer, the head-averaged attention reduced to segment sums
    on the device, so no ``[L, L]`` matrix leaves it."""
    from g2e_jax.programs.encode import embed_batch

    def run(state, sys_ids, header_ids, segment, **arrays):
        _, attentions = embed_batch(
            nnx.merge(graphdef, state), sys_ids, header_ids, **arrays, output_attentions=True
        )
        onehot = jax.nn.one_hot(segment, 3, dtype=jnp.float32)  # padding (-1) -> zero row
        real = segment >= 0
        last = jnp.sum(real) - 1
        lam, last_row = [], []
        for probs in attentions:  # [1, H, L, L]
            mean = probs[0].mean(axis=0)  # [L, L]
            lam.append(jnp.where(real[:, None], mean, 0.0).sum(axis=0) @ onehot)
            last_row.append(mean[last] @ onehot)
        return jnp.stack(lam), jnp.stack(last_row)

    return jax.jit(run, static_argnames=("scheme", "pad_id", "max_patches_per_image"))


# --- the command -----------------------------------------------------------------------------------


def analysis_config() -> ml_collections.ConfigDict:
    """Defaults of `g2e-jax analyze-attention` (the model and prompt fields of every embedding job)."""
    c = ml_collections.ConfigDict()
    c.model = model_section(dtype="float32", adapter=False)  # attention probabilities compared in float32
    c.prompt = prompt_section()

    c.role = "query"  # the template the rows are analysed in: query or document
    c.max_len = 1024
    c.image_resolution = config_dict.placeholder(str)
    c.batch_size = 1  # unused (one row at a time); kept so the Embedder reads the usual fields
    return c


def run_analysis(cfg, input_path: str | Path, output_dir: str | Path) -> dict:
    """Profiles every row of a JSONL file (``{"id", "text", "image"}``, as for ``g2e-jax embed``) and
    writes ``attention.json`` (per row and averaged) and ``attention.png``; returns the JSON."""
    from g2e_jax.data.jsonl import read_embed_rows
    from g2e_jax.embed import Embedder, InputError

    rows, _ = read_embed_rows(input_path)
    if not rows:
        raise ValueError(f"{input_path}: no rows")
    embedder = Embedder.from_config(cfg)
    profiles = []
    for row in tqdm(rows, desc="analysing attention", unit="row", disable=len(rows) < 2):
        try:
            profile = attention_profile(embedder, row.text, row.image, role=cfg.role)
        except InputError as e:
            raise ValueError(
                f"{input_path} line {row.line} (id {row.id!r}), field {e.field!r}: {e.reason}"
            ) from None
        profiles.append({"id": row.id, **{k: v.tolist() for k, v in profile.items()}})
    keys = ("lambda", "efficiency", "last_token", "lengths")
    average = {k: np.mean([p[k] for p in profiles], axis=0).tolist() for k in keys}
    result = {
        "model_path": str(embedder.model_path),
        "prompt": dataclasses.asdict(embedder.prompt),
        "role": cfg.role,
        "segments": list(SEGMENTS),
        "layers": len(average["lambda"]),
        "average": average,
        "rows": profiles,
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "attention.json", json.dumps(result, indent=1) + "\n")
    title = f"attention by segment ({len(rows)} rows, {cfg.role})"
    plots.attention_shares(average, SEGMENTS, out / "attention.png", title)
    return result


