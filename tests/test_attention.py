"""The CPU attention (a rematerialised loop over examples) equals XLA's `jax.nn.dot_product_attention`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dret.models.attention import dot_product_attention
from dret.models.logical import activation_rules
from dret.sharding import ActivationConstraint, batch_sharding, make_mesh

B, T, N, H = 8, 24, 4, 16


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
    lengths = np.array([1, 3, T, T - 1, 7, 12, T, 2])
    return q, k, v, jnp.asarray(np.arange(T)[None] < lengths[:, None])


def _reference(q, k, v, mask_bt, is_causal=False):
    return jax.nn.dot_product_attention(q, k, v, mask=mask_bt[:, None, None, :], is_causal=is_causal)


def _loss(attend, q, k, v, mask_bt, is_causal):
    out_btnh = attend(q, k, v, mask_bt, is_causal=is_causal)
    return (out_btnh * jnp.cos(jnp.arange(out_btnh.size).reshape(out_btnh.shape))).sum()


@pytest.mark.parametrize("is_causal", [False, True])
def test_values_and_gradients_equal_xla(is_causal):
    q, k, v, mask_bt = _inputs()
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask_bt, is_causal=is_causal),
                               _reference(q, k, v, mask_bt, is_causal), rtol=1e-5, atol=1e-6)
    grads = jax.grad(_loss, argnums=(1, 2, 3))(dot_product_attention, q, k, v, mask_bt, is_causal)
    want = jax.grad(_loss, argnums=(1, 2, 3))(_reference, q, k, v, mask_bt, is_causal)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_half_precision_inputs_give_their_dtype_back():
    q, k, v, mask_bt = _inputs()
    out = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask_bt)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, mask_bt), atol=0.05)


def test_batch_sharded_input_stays_sharded_and_equal():
    """Under the trainer's rules each loop step takes one example per shard, so no example leaves its device."""
    mesh = make_mesh(8, 1, 1)
    q, k, v, mask_bt = _inputs(seed=1)
    sharded = batch_sharding(mesh)
    placed = [jax.device_put(x, sharded) for x in (q, k, v, mask_bt)]

    @jax.jit
    def attend(q, k, v, mask_bt):
        with activation_rules(ActivationConstraint(mesh)):
            return dot_product_attention(q, k, v, mask_bt)

    compiled = attend.lower(*placed).compile()
    assert "all-gather" not in compiled.as_text() and "all-to-all" not in compiled.as_text()
    out = compiled(*placed)
    assert out.sharding.is_equivalent_to(sharded, out.ndim)
    np.testing.assert_allclose(out, _reference(q, k, v, mask_bt), rtol=1e-5, atol=1e-6)


def test_accelerator_branch_equals_the_cpu_loop(monkeypatch):
    """The GPU / TPU branch (XLA or cuDNN, mask broadcast to [B, 1, T, S] as cuDNN requires) gives the same values."""
    q, k, v, mask_bt = _inputs(seed=2)
    on_cpu = dot_product_attention(q, k, v, mask_bt)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask_bt), on_cpu, rtol=1e-5, atol=1e-6)
