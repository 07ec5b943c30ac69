"""losses.py against a plain float64 numpy implementation of the reference's two loss modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dret.losses import contrastive_loss, matryoshka_loss


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_loss(q, p, group_size, temperature, margin, use_inbatch_neg):
    """Row by row: PaddleNLP hard_negative_loss / in_batch_negative_loss in float64."""
    q, p = q.astype(np.float64), p.astype(np.float64)
    losses, hits = [], []
    for i in range(len(q)):
        if use_inbatch_neg:
            cand, target = p[::group_size], i
            s = cand @ q[i]
            s[i] -= margin
        else:
            cand, target = p, i * group_size
            s = cand @ q[i]
        s = s / temperature
        lse = np.log(np.exp(s - s.max()).sum()) + s.max()
        losses.append(lse - s[target])
        hits.append(np.argmax(s) == target)
    return np.mean(losses), np.mean(hits)


def _embeddings(b, g, d, seed=0):
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(b, d))).astype(np.float32), _unit(rng.normal(size=(b * g, d))).astype(np.float32)


@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("use_inbatch_neg", [False, True])
@pytest.mark.parametrize("temperature,margin", [(0.02, 0.2), (1.0, 0.0), (0.05, 0.5)])
def test_contrastive_matches_numpy(group_size, use_inbatch_neg, temperature, margin):
    q, p = _embeddings(6, group_size, 16)
    kw = dict(group_size=group_size, temperature=temperature, margin=margin, use_inbatch_neg=use_inbatch_neg)
    loss, metrics = contrastive_loss(jnp.asarray(q), jnp.asarray(p), **kw)
    want_loss, want_acc = _np_loss(q, p, **kw)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), want_acc, atol=1e-6)


def test_margin_only_in_inbatch_mode():
    q, p = _embeddings(4, 3, 8)
    kw = dict(group_size=3, temperature=0.05, use_inbatch_neg=False)
    a, _ = contrastive_loss(q, p, margin=0.0, **kw)
    b, _ = contrastive_loss(q, p, margin=0.7, **kw)
    assert float(a) == float(b)
    kw["use_inbatch_neg"] = True
    a, _ = contrastive_loss(q, p, margin=0.0, **kw)
    b, _ = contrastive_loss(q, p, margin=0.7, **kw)
    assert float(b) > float(a)


def test_labels_follow_global_passage_order():
    """Distinct passages; query i equals passage i*G, so every query's target is its own positive."""
    b, g = 4, 3
    _, p = _embeddings(b, g, 32, seed=1)
    q = p[::g]
    loss, metrics = contrastive_loss(q, p, group_size=g, temperature=0.02, margin=0.0, use_inbatch_neg=False)
    assert float(metrics["accuracy"]) == 1.0
    # Shifting the queries by one group breaks every label.
    _, shifted = contrastive_loss(np.roll(q, 1, axis=0), p, group_size=g, temperature=0.02, margin=0.0,
                                  use_inbatch_neg=False)
    assert float(shifted["accuracy"]) == 0.0


def test_matryoshka_matches_numpy():
    q, p = _embeddings(5, 2, 32, seed=2)
    rng = np.random.default_rng(3)
    q, p = q * rng.uniform(0.5, 2, size=(5, 1)), p  # unnormalised queries: each dim re-normalises
    dims, weights = [8, 16, 32], [1.0, 0.5, 2.0]
    kw = dict(group_size=2, temperature=0.05, margin=0.2, use_inbatch_neg=False)
    total, metrics = matryoshka_loss(jnp.asarray(q), jnp.asarray(p), dims=dims, weights=weights, **kw)
    want = 0.0
    for dim, w in zip(dims, weights):
        loss_dim, _ = _np_loss(_unit(q[:, :dim]), _unit(p[:, :dim]), **kw)
        np.testing.assert_allclose(float(metrics[f"loss_dim_{dim}"]), loss_dim, rtol=1e-5)
        want += w * loss_dim
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert "accuracy" in metrics


def test_jit_and_finite_grads():
    q, p = _embeddings(4, 2, 16)
    kw = dict(group_size=2, temperature=0.02, margin=0.2, use_inbatch_neg=False)

    @jax.jit
    def both(q, p):
        f = lambda q, p: matryoshka_loss(q, p, dims=[8, 16], weights=[1.0, 1.0], **kw)[0]  # noqa: E731
        return jax.value_and_grad(f, argnums=(0, 1))(q, p), contrastive_loss(q, p, **kw)

    (value, (g_q, g_p)), (loss, _) = both(jnp.asarray(q, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16))
    assert loss.dtype == jnp.float32 and value.dtype == jnp.float32
    assert np.isfinite(float(value)) and np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(g_q, np.float32))) and np.all(np.isfinite(np.asarray(g_p, np.float32)))


def test_wrong_passage_count():
    q, p = _embeddings(4, 2, 8)
    with pytest.raises(ValueError, match="group_size"):
        contrastive_loss(q, p[:-1], group_size=2, temperature=0.02, margin=0.0, use_inbatch_neg=False)


def test_sharded_global_batch_equals_unsharded():
    """Queries and passages sharded over 8 devices: labels still follow the global passage order."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    q, p = _embeddings(8, 2, 16, seed=4)
    kw = dict(group_size=2, temperature=0.02, margin=0.2, use_inbatch_neg=False)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    shard = NamedSharding(mesh, P("data"))
    loss, metrics = jax.jit(lambda q, p: contrastive_loss(q, p, **kw))(jax.device_put(q, shard), jax.device_put(p, shard))
    want_loss, want_acc = _np_loss(q, p, **kw)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), want_acc)
