"""Periodic evaluation inside a training run: MMEB on the held-out set with the current parameters."""

from __future__ import annotations

import json

import jax
from flax import nnx


def evaluate_now(run, step: int) -> dict:
    """MMEB on the configured held-out set with the current parameters (adapters merged on a copy),
    data-parallel on the training mesh: each process encodes its share of the rows."""
    from g2e_jax.adapters.lora import merge_adapters
    from g2e_jax.embed import Embedder
    from g2e_jax.eval.mmeb import MMEB_GROUPS, evaluate_mmeb, load_groups

    e = run.cfg.eval
    model = nnx.clone(nnx.merge(run.graphdef, run.params, run.rest))
    merge_adapters(model)
    embedder = Embedder(model, run.preprocessor, batch_size=run.cfg.batch_size, mesh=run.mesh)
    groups = MMEB_GROUPS if e.groups_file is None else load_groups(e.groups_file)
    subsets = list(e.subsets) or list(groups)
    result = evaluate_mmeb(embedder, e.root, subsets, image_dir=e.image_dir, groups=groups, progress=False)
    record = {"step": step, **{k: result["summary"][k] for k in ("overall", "IND", "OOD")},
              **{s: r["precision_at_1"] for s, r in result["subsets"].items()}}  # fmt: skip
    if jax.process_index() == 0:
        with open(run.workdir / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return record
