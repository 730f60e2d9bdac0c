"""Every backbone at its real widths (2 decoder layers, 2 vision blocks: widths are what shard), built
abstractly (``nnx.eval_shape``: nothing allocated) on 8 simulated CPU devices with fsdp=8: the sharding
each parameter gets from the logical axes it declares.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/declared_sharding_checks.py OUT.json
tests/test_declared_sharding.py asserts on OUT.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from g2e_jax.adapters.lora import AdapterConfig
from g2e_jax.mesh import LOGICAL_RULES, make_mesh, shard_model
from g2e_jax.models import BACKBONES
from g2e_jax.models.common.config import TextConfig
from g2e_jax.models.llava_next.config import LlavaNextConfig, one_d_rope
from g2e_jax.models.qwen2_5_vl.config import QWEN2_5_VL_3B, QWEN2_5_VL_7B
from g2e_jax.models.qwen2_vl.config import Qwen2VLConfig, VisionConfig, tiny_config
from g2e_jax.models.qwen2_vl.model import Qwen2VL
from g2e_jax.models.qwen3_vl.config import QWEN3_VL_2B
from g2e_jax.train.report import abstract_train_state, sharding_report
from g2e_jax.train.step import make_optimizer

LAYERS, BLOCKS = 2, 2


def _qwen2_vl(text: dict, tied: bool) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text=TextConfig(**text, num_hidden_layers=LAYERS),
        vision=VisionConfig(depth=BLOCKS, out_hidden_size=text["hidden_size"]),
        tie_word_embeddings=tied,
    )


def _qwen2_5_vl(base):
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, num_hidden_layers=LAYERS),
        vision=dataclasses.replace(base.vision, depth=BLOCKS, fullatt_block_indexes=(BLOCKS - 1,)),
    )


def _qwen3_vl(base):
    """DeepStack taps after both blocks: their mergers shard too."""
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, num_hidden_layers=LAYERS),
        vision=dataclasses.replace(base.vision, depth=BLOCKS, deepstack_visual_indexes=tuple(range(BLOCKS))),
    )


def _llava_next(text: TextConfig | None = None) -> LlavaNextConfig:
    base = LlavaNextConfig() if text is None else LlavaNextConfig(text=text)  # default: Mistral-7B
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, num_hidden_layers=LAYERS),
        vision=dataclasses.replace(base.vision, depth=BLOCKS),
    )


# (model_type, size) -> the released model's widths (their config.json), at LAYERS + BLOCKS depth.
CONFIGS = {
    ("qwen2_vl", "2b"): lambda: _qwen2_vl(dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                               num_attention_heads=12, num_key_value_heads=2), tied=True),
    ("qwen2_vl", "7b"): lambda: _qwen2_vl(dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                               num_attention_heads=28, num_key_value_heads=4), tied=False),
    ("qwen2_5_vl", "3b"): lambda: _qwen2_5_vl(QWEN2_5_VL_3B),
    ("qwen2_5_vl", "7b"): lambda: _qwen2_5_vl(QWEN2_5_VL_7B),
    ("qwen3_vl", "2b"): lambda: _qwen3_vl(QWEN3_VL_2B),
    ("llava_next", "mistral-7b"): _llava_next,
    ("llava_next", "vicuna-7b"): lambda: _llava_next(one_d_rope(TextConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
        num_key_value_heads=32, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2))),
}  # fmt: skip


def replicated_names(mesh) -> list[str]:
    """The logical names this mesh leaves replicated by rule (None, or mesh axes of size 1)."""
    out = []
    for name, axes in LOGICAL_RULES.items():
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if all(mesh.shape.get(a, 1) == 1 for a in axes):
            out.append(name)
    return out


def width_checks(results):
    mesh = make_mesh(fsdp=8)
    tx = make_optimizer(learning_rate=5e-5, total_steps=1500, warmup_steps=100)
    adapter = AdapterConfig(kind="dora", rank=8, alpha=64.0, dropout=0.1)  # every adapter parameter kind
    results["replicated_names"] = replicated_names(mesh)
    for (model_type, size), make in CONFIGS.items():
        backbone, cfg = BACKBONES[model_type], make()

        def build(backbone=backbone, cfg=cfg):
            return backbone.model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

        _, params, rest, opt_state = abstract_train_state(build, adapter, tx, mesh)
        report = sharding_report(params, rest, opt_state, mesh)
        results[f"{model_type}/{size}"] = {
            "model_class": type(nnx.eval_shape(build)).__name__,
            "rows": [
                {"path": r.path, "shape": list(r.shape), "logical": list(r.logical), "spec": r.spec,
                 "total": r.total, "per_device": r.per_device, "trainable": r.trainable, "fallback": r.fallback}
                for r in report.rows
            ],
            "summary": report.summary(),
        }  # fmt: skip


def eager_checks(results):
    """Built concretely inside ``jax.set_mesh``: no parameter is sharded at construction (eager
    sharding off); ``shard_model`` then places each by its declared axes."""
    mesh = make_mesh(fsdp=8)
    with jax.set_mesh(mesh):
        model = Qwen2VL(tiny_config(), rngs=nnx.Rngs(0))
    arrays = jax.tree.leaves(nnx.state(model, nnx.Param))
    results["eager/devices_per_param"] = sorted({len(x.sharding.device_set) for x in arrays})
    results["eager/fully_replicated"] = all(x.sharding.is_fully_replicated for x in arrays)
    shard_model(model, mesh)
    flat = {".".join(map(str, k)): v.get_value()
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}  # fmt: skip
    results["placed/embed_tokens"] = str(flat["text.embed_tokens.embedding"].sharding.spec)
    results["placed/sharded_params"] = sum(1 for x in flat.values() if not x.sharding.is_fully_replicated)
    results["placed/params"] = len(flat)


def main(out: str) -> None:
    results = {"devices": jax.device_count()}
    width_checks(results)
    eager_checks(results)
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
