"""Sharding declared where parameters are made: every parameter names its logical axes, one table maps
them to mesh axes, and nothing falls back to replication (issue 30).

The 8-device checks run in one subprocess (tests/declared_sharding_checks.py) on abstract models: every
backbone at its released widths, 2 decoder layers and 2 vision blocks, fsdp=8, DoRA adapters on.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import pytest
from conftest import report, shared_results
from flax import nnx

from g2e_jax.mesh import LOGICAL_RULES, NO_AXES, declared, make_mesh, state_shardings
from g2e_jax.models import BACKBONES

HERE = Path(__file__).resolve().parent
CASES = [
    ("qwen2_vl", "2b"), ("qwen2_vl", "7b"), ("qwen2_5_vl", "3b"), ("qwen2_5_vl", "7b"), ("qwen3_vl", "2b"),
    ("llava_next", "mistral-7b"), ("llava_next", "vicuna-7b"),
]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory, "declared_sharding_checks", "declared_sharding_checks.py")


def test_every_backbone_is_covered(results):
    assert results["devices"] == 8
    assert {t for t, _ in CASES} == set(BACKBONES)
    for model_type, size in CASES:
        assert results[f"{model_type}/{size}"]["model_class"] == BACKBONES[model_type].model.__name__


def _per_layer_ndim(row) -> int:
    return sum(1 for name in row["logical"] if name != "layers")


@pytest.mark.parametrize("model_type,size", CASES)
def test_fsdp8_replicates_only_what_the_table_names(results, model_type, size):
    r = results[f"{model_type}/{size}"]
    rows = r["rows"]
    by_rule = set(results["replicated_names"])  # names whose rule gives no mesh axis of size > 1 here
    fallbacks = [(x["path"], x["fallback"]) for x in rows if x["fallback"]]
    assert fallbacks == [], r["summary"]
    for x in rows:
        assert len(x["logical"]) == len(x["shape"]), x["path"]
        if x["per_device"] == x["total"]:  # replicated: every one of its axes is replicated by rule
            assert set(x["logical"]) <= by_rule, (x["path"], x["logical"])
        else:
            assert not set(x["logical"]) <= by_rule, (x["path"], x["logical"])
    # Matrices per layer (a stacked parameter's leading ``layers`` axis not counted).
    frozen_matrices = [x for x in rows if _per_layer_ndim(x) >= 2 and not x["trainable"]]
    assert frozen_matrices and all(x["per_device"] * 8 == x["total"] for x in frozen_matrices), [
        x["path"] for x in frozen_matrices if x["per_device"] * 8 != x["total"]
    ]
    total = sum(x["total"] for x in rows)
    local = sum(x["per_device"] for x in rows)
    meant = sum(x["per_device"] for x in rows if x["per_device"] == x["total"])
    report(f"{model_type} {size} widths, fsdp=8 (abstract)", total=total, per_device=local,
           replicated_by_rule=meant)  # fmt: skip
    assert local <= total / 8 + meant
    assert meant < 0.01 * total  # norms, biases of tensor-parallel axes, adapters: small


@pytest.mark.parametrize("size", ["mistral-7b", "vicuna-7b"])
def test_llava_next_vision_tower_and_projector_are_sharded(results, size):
    """They matched no rule of the path table and stayed whole on every device; now they declare axes."""
    rows = results[f"llava_next/{size}"]["rows"]
    vision = [x for x in rows if x["path"].split(".")[0] in ("vision_tower", "multi_modal_projector")]
    matrices = [x for x in vision if _per_layer_ndim(x) >= 2]
    # Patch and position embeddings, 6 kernels per CLIP layer (per-layer or stacked), 2 projector linears.
    assert len({re.sub(r"\.\d+\.", ".", x["path"]) for x in matrices}) == 2 + 6 + 2
    unsharded = [x["path"] for x in matrices if "fsdp" not in x["spec"]]
    assert matrices and not unsharded, unsharded
    newline = next(x for x in rows if x["path"] == "image_newline")
    cls = next(x for x in rows if x["path"] == "vision_tower.embeddings.class_embedding")
    assert newline["spec"] == cls["spec"] == "P('fsdp',)"
    total, local = sum(x["total"] for x in vision), sum(x["per_device"] for x in vision)
    report(f"llava_next {size}: CLIP tower (2 layers) + projector, fsdp=8", total=total, per_device=local)
    assert local < total / 7


def test_construction_never_shards_and_placing_follows_the_declared_axes(results):
    assert results["eager/fully_replicated"]  # built inside jax.set_mesh(fsdp=8 mesh)
    assert results["placed/embed_tokens"] == "P(None, 'fsdp')"
    assert results["placed/sharded_params"] > 0


# --- in process: the declarations themselves, and the errors of a parameter that forgets them ----------


def _tiny_model(model_type="qwen2_vl"):
    backbone = BACKBONES[model_type]
    return backbone.model(backbone.tiny_config(), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_every_parameter_declares_axes_of_the_table(model_type):
    model = _tiny_model(model_type)
    for keys, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = v.get_metadata().get("out_sharding")
        path = ".".join(map(str, keys))
        assert axes is not None and len(axes) == v.get_value().ndim, path
        assert all(a in LOGICAL_RULES for a in axes), (path, axes)
        assert v.get_metadata()["eager_sharding"] is False, path


def test_a_parameter_without_declared_axes_is_an_error_naming_its_path():
    from g2e_jax.train.report import sharding_report

    model = _tiny_model()
    mesh = make_mesh(fsdp=1)
    state_shardings(nnx.state(model), mesh)  # as built: every parameter declares its axes
    model.visual.merger.extra = nnx.Param(jnp.zeros((4, 8)))  # the deliberate bug
    with pytest.raises(ValueError, match=rf"visual\.merger\.extra: {NO_AXES}"):
        state_shardings(nnx.state(model), mesh)
    rows = {r.path: r for r in sharding_report(nnx.state(model), nnx.State({}), {}, mesh).rows}
    assert rows["visual.merger.extra"].fallback == NO_AXES
    assert rows["visual.merger.fc1.kernel"].logical == ("merge", "vision_embed")
    assert not rows["visual.merger.fc1.kernel"].fallback


def test_an_axis_the_table_does_not_name_is_an_error():
    model = _tiny_model()
    model.text.norm.scale = nnx.Param(jnp.ones((64,)), **declared(("nrom",)))  # a typo
    with pytest.raises(ValueError, match=r"text\.norm\.scale: logical axis 'nrom' is not in"):
        state_shardings(nnx.state(model), make_mesh(fsdp=1))


def test_linear_cannot_be_made_without_axes():
    from g2e_jax.models.common.layers import linear

    with pytest.raises(TypeError, match="axes"):
        linear(4, 8, bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    layer = linear(4, 8, axes=("embed", "mlp"), bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(0))  # fmt: skip
    assert layer.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert layer.bias.get_metadata()["out_sharding"] == ("mlp",)
