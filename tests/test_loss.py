"""Contrastive loss: the official loss with filters off, and each filter on hand-made cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import report
from g2e_jax.train.loss import contrastive_loss


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_filters_off_equal_the_official_loss():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q = _unit(rng.standard_normal((32, 24))).astype(np.float32)
    t = _unit(q + rng.standard_normal((32, 24))).astype(np.float32)
    loss, metrics = contrastive_loss(jnp.asarray(q), jnp.asarray(t), temperature=0.02)
    # The reference: cross_entropy(q @ t.T / temperature, arange), mean over rows.
    logits = torch.from_numpy(q) @ torch.from_numpy(t).T
    ref = torch.nn.functional.cross_entropy(logits / 0.02, torch.arange(32)).item()
    report("loss vs official InfoNCE (filters off)", abs_diff=abs(float(loss) - ref))
    assert abs(float(loss) - ref) <= 1e-6 * max(1.0, abs(ref))
    assert int(metrics["masked"]) == 0
    np.testing.assert_allclose(
        float(metrics["accuracy"]), float((logits.argmax(1) == torch.arange(32)).float().mean())
    )
    np.testing.assert_allclose(float(metrics["pos_score"]), np.mean(np.sum(q * t, 1)), atol=1e-6)


# Hand-made: 3 rows with one-hot queries, so s_ij = q_i . t_j is row i of the matrix written below.
Q = np.eye(3, dtype=np.float32)
T = np.array([[0.9, 0.1, 0.3], [0.5, 0.8, 0.95], [0.2, 0.0, 0.7]], dtype=np.float32).T  # s = Q @ T.T = T.T


def _masked_logits(**kw):
    """Which negatives survive, read back from the loss: the per-row loss with temperature 1 is
    logsumexp(kept scores + positive) - positive, so compare against that directly."""
    loss, metrics = contrastive_loss(jnp.asarray(Q), jnp.asarray(T), temperature=1.0, **kw)
    return float(loss), int(metrics["masked"])


def _expected(keep):
    s = Q @ T.T
    per_row = [np.log(np.exp(s[i, i]) + sum(np.exp(s[i, j]) for j in keep[i])) - s[i, i] for i in range(3)]
    return float(np.mean(per_row))


def test_target_ids_mask_same_content():
    loss, masked = _masked_logits(target_ids=jnp.array([7, 7, 8]))
    assert masked == 2 and loss == pytest.approx(_expected({0: [2], 1: [2], 2: [0, 1]}), abs=1e-6)


def test_query_ids_mask_same_query():
    loss, masked = _masked_logits(query_ids=jnp.array([1, 2, 1]))
    assert masked == 2 and loss == pytest.approx(_expected({0: [1], 1: [0, 2], 2: [1]}), abs=1e-6)


def test_query_threshold_masks_near_duplicate_queries():
    q = _unit(np.array([[1, 0], [0.99, 0.14], [0, 1]], np.float32))
    t = _unit(np.array([[1, 0.1], [0.9, 0.3], [0.1, 1]], np.float32))
    _, m = contrastive_loss(jnp.asarray(q), jnp.asarray(t), fn_query_threshold=0.95)
    assert int(m["masked"]) == 2  # rows 0 and 1 mask each other (cos 0.99); row 2 keeps both
    _, m = contrastive_loss(jnp.asarray(q), jnp.asarray(t), fn_query_threshold=0.999)
    assert int(m["masked"]) == 0


def test_margin_masks_candidates_above_the_positive():
    # Row 1: positive 0.8, candidate 2 scores 0.95 > 0.8 + 0.1 -> masked; candidate 0 (0.5) kept.
    loss, masked = _masked_logits(fn_margin=0.1)
    assert masked == 1 and loss == pytest.approx(_expected({0: [1, 2], 1: [0], 2: [0, 1]}), abs=1e-6)


def test_hard_k_keeps_the_hardest():
    loss, masked = _masked_logits(hard_k=1)
    # s rows: [.9, .1, .3] -> keeps 2; [.5, .8, .95] -> keeps 2; [.2, 0, .7] -> keeps 0.
    assert masked == 3 and loss == pytest.approx(_expected({0: [2], 1: [2], 2: [0]}), abs=1e-6)


def test_padding_rows_are_neither_loss_nor_candidates():
    loss, m = contrastive_loss(
        jnp.asarray(Q), jnp.asarray(T), temperature=1.0, valid=jnp.array([True, True, False])
    )
    s = Q @ T.T
    expected = np.mean([np.log(np.exp(s[0, 0]) + np.exp(s[0, 1])) - s[0, 0],
                        np.log(np.exp(s[1, 1]) + np.exp(s[1, 0])) - s[1, 1]])  # fmt: skip
    assert float(loss) == pytest.approx(expected, abs=1e-6) and int(m["masked"]) == 0


def test_gradient_flows_to_queries_and_targets_only_through_scores():
    rng = np.random.default_rng(1)
    q = jnp.asarray(_unit(rng.standard_normal((6, 4))), jnp.float32)
    t = jnp.asarray(_unit(rng.standard_normal((6, 4))), jnp.float32)
    grads = jax.grad(
        lambda q, t: contrastive_loss(q, t, fn_query_threshold=0.0, hard_k=2)[0], argnums=(0, 1)
    )(q, t)
    assert all(np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0 for g in grads)
