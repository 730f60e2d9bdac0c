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
    mlp = GatedMLP(16, 64, "silu", bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
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
