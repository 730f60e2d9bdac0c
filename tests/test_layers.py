"""Memory-bounded building blocks: attention over groups of rows and query blocks, MLPs over row
groups. Each gives what the one-call computation gives, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g2e_jax.models.common import layers
from g2e_jax.models.common.layers import GatedMLP, bounded_attention, map_rows


def _qkv(seed=0, b=3, lq=37, lk=41, h=4, hk=2, d=8):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, lq, h, d)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(b, lk, hk, d)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(r.random((b, 1, lq, lk)) > 0.3)
    return q, k, v, mask, jnp.asarray([41, 20, 5])


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_bounded_attention_equals_one_call(with_mask, with_lengths):
    """Budgets from two rows per step down to one query per step (blocks that end inside a row)."""
    q, k, v, mask, lengths = _qkv()
    mask, lengths = (mask if with_mask else None), (lengths if with_lengths else None)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=lengths)
    per_row = q.shape[2] * q.shape[1] * k.shape[1]
    for budget in (2 * per_row, per_row, q.shape[2] * k.shape[1] * 10, q.shape[2] * k.shape[1] * 3, 1):
        got = jax.jit(lambda q, k, v, b=budget: bounded_attention(q, k, v, mask, lengths, budget=b))(q, k, v)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"budget {budget}")


def test_attention_runs_in_groups_past_the_budget(monkeypatch):
    """Past ``SCORE_BUDGET`` the program holds a fraction of the scores: its temporaries shrink."""
    q, k, v, mask, _ = _qkv(b=8, lq=256, lk=256, h=4, hk=4, d=8)

    def temp(budget):
        monkeypatch.setattr(layers, "SCORE_BUDGET", budget)
        fn = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask))
        return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores = 8 * 4 * 256 * 256 * 4
    assert temp(1 << 40) >= scores  # one call: every score at once
    assert temp(4 * 256 * 32) < scores / 4


def test_map_rows_equals_one_call_values_and_gradients(monkeypatch):
    monkeypatch.setattr(layers, "ACTIVATION_BUDGET", 64 * 5)  # 5 rows of the 64-wide hidden per step
    mlp = GatedMLP(
        16,
        64,
        "silu",
        axes=("embed", "mlp"),
        bias=True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 16)), jnp.float32)  # 21 rows: 5 groups

    def loss(m, x):
        return (m(x) ** 2).sum()

    def direct(m, x):
        return m.down_proj(m.act(m.gate_proj(x)) * m.up_proj(x))

    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(mlp, x), direct(mlp, x), atol=1e-6)
    grads = nnx.grad(loss)(mlp, x)
    want = nnx.grad(lambda m, x: (direct(m, x) ** 2).sum())(mlp, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # It did run in groups: a lax.map (a while loop) is in the program.
    assert "while" in jax.jit(lambda x: map_rows(lambda h: direct(mlp, h), x, 64, mlp)).lower(x).as_text()


def test_map_rows_leaves_modules_with_random_streams_alone(monkeypatch):
    """A module that draws random numbers (adapter dropout) runs in one call."""
    monkeypatch.setattr(layers, "ACTIVATION_BUDGET", 1)
    drop = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    x = jnp.ones((6, 4))
    out = map_rows(lambda h: drop(h), x, 4, drop)
    assert out.shape == x.shape
    assert "while" not in jax.jit(lambda x: map_rows(lambda h: h * 2, x, 4, drop)).lower(x).as_text()


def _deep_tiny(backbone: str):
    """The backbone's tiny model with 5 decoder layers and 5 vision blocks (Qwen2.5-VL: blocks 1 and 3
    with full attention), random weights."""
    import dataclasses

    from g2e_jax import models
    from g2e_jax.models.tiny import random_model

    b = models.backbone_of(backbone)
    cfg = b.tiny_config()
    vision = {"depth": 5} | ({"fullatt_block_indexes": (1, 3)} if backbone == "qwen2_5_vl" else {})
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=5),
                      vision=dataclasses.replace(cfg.vision, **vision))  # fmt: skip
    return random_model(b, cfg, seed=1)


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_scan_unroll_gives_the_same_hidden_states(backbone):
    """``scan_unroll`` (layers per scan iteration; 2 of 5 leaves a remainder) changes the program, not
    the parameters (one layout for every factor) nor the hidden states: every decoder layer's, and the
    vision tower's output (LLaVA-NeXT's CLIP over a slice of its stack: 4 of 5 layers)."""
    model = _deep_tiny(backbone)
    shapes = jax.tree.map(lambda a: a.shape, nnx.state(model))
    rng = np.random.default_rng(0)
    length = 12
    embeds = jnp.asarray(rng.standard_normal((2, length, model.config.text.hidden_size)), jnp.float32)
    mask = jnp.asarray(np.arange(length)[None] < np.array([[length], [7]]), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length)[None, None], (3, 2, length))
    if backbone == "llava_next":
        v = model.config.vision
        pixels = jnp.asarray(rng.standard_normal((2, v.in_channels, v.image_size, v.image_size)), jnp.float32)

        def tower(unroll):
            return model.vision_tower(pixels, 4, scan_unroll=unroll)
    else:
        grid = np.array([[1, 4, 6], [1, 2, 4]])
        pixels = jnp.asarray(rng.standard_normal((32, model.config.vision.patch_dim)), jnp.float32)

        def tower(unroll):
            return model.visual(pixels, grid, 24, scan_unroll=unroll)

    def run(unroll):
        @jax.jit
        def fn(embeds):
            _, hidden = model.text(embeds, mask, positions, output_hidden_states=True, scan_unroll=unroll)
            return hidden, tower(unroll)

        return fn(embeds)

    (hidden_1, vision_1), (hidden_2, vision_2) = run(1), run(2)
    assert len(hidden_1) == len(hidden_2) == 6
    for i, (a, b) in enumerate(zip(hidden_1, hidden_2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5, err_msg=f"layer {i}")
    np.testing.assert_allclose(np.asarray(vision_2), np.asarray(vision_1), atol=1e-5, rtol=1e-5)
    assert jax.tree.map(lambda a: a.shape, nnx.state(model)) == shapes
    if backbone == "llava_next":  # 4 of 5 layers ran: not the 5th
        full = jax.jit(lambda p: model.vision_tower(p, 5))(pixels)
        assert float(jnp.abs(full - vision_1).max()) > 1e-3


def test_stack_layers_gives_every_variable_a_layer_axis_and_each_layer_its_own_keys():
    """``stack_layers``: parameters and random streams ``[n, ...]``, layers initialised apart;
    ``scan_layers`` advances each layer's stream once per call, only the layers that ran."""

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.lin(x))

    stack = layers.stack_layers(Layer, 3, nnx.Rngs(0, dropout=1))
    assert stack.stack_size == 3 and layers.stack_paths(nnx.Dict(s=stack)) == [("s",)]
    assert all(a.shape[0] == 3 for a in jax.tree.leaves(nnx.state(stack)))
    kernel = np.asarray(stack.lin.kernel[...])
    assert not np.allclose(kernel[0], kernel[1])
    x = jnp.ones((2, 4))
    out, ys = layers.scan_layers(stack, lambda m, c, _: (m(c), c.sum()), x)
    assert out.shape == x.shape and ys.shape == (3,)
    np.testing.assert_array_equal(np.asarray(stack.drop.rngs.count[...]), [1, 1, 1])
    layers.scan_layers(stack, lambda m, c, _: (m(c), None), x, length=2)
    np.testing.assert_array_equal(np.asarray(stack.drop.rngs.count[...]), [2, 2, 1])


def test_map_rows_inside_the_layer_scan(monkeypatch):
    """In a scan body each layer's MLP still runs in groups of rows (the same values), and a layer that
    draws random numbers (its stacked stream, scanned) still runs in one call and advances its stream."""
    monkeypatch.setattr(layers, "ACTIVATION_BUDGET", 64 * 5)
    kw = dict(bias=True, dtype=jnp.float32, param_dtype=jnp.float32)  # noqa: C408
    stack = layers.stack_layers(
        lambda r: GatedMLP(16, 64, "silu", axes=("embed", "mlp"), rngs=r, **kw), 3, nnx.Rngs(0)
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 16)), jnp.float32)

    def run(x):
        return layers.scan_layers(stack, lambda m, c, _: (m(c), None), x)[0]

    graph, state = nnx.split(stack)
    want = x
    for i in range(3):  # each layer on its own, in one call
        one = nnx.merge(graph, jax.tree.map(lambda a, i=i: a[i], state))
        want = one.down_proj(one.act(one.gate_proj(want)) * one.up_proj(want))
    np.testing.assert_allclose(jax.jit(run)(x), want, atol=1e-5)
    assert jax.jit(run).lower(x).as_text().count("while") >= 2  # the scan's, and the row groups' inside it

    class Noisy(GatedMLP):
        def __init__(self, rngs):
            super().__init__(16, 64, "silu", axes=("embed", "mlp"), rngs=rngs, **kw)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return layers.map_rows(
                lambda h: self.drop(self.down_proj(self.gate_proj(h))), x, self.hidden, self
            )

    noisy = layers.stack_layers(Noisy, 3, nnx.Rngs(0, dropout=1))
    out, _ = layers.scan_layers(noisy, lambda m, c, _: (m(c), None), x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(noisy.drop.rngs.count[...]), [1, 1, 1])
