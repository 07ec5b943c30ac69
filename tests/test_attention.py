"""The CPU attention (`dret.models.cpu`: the fused C++ kernel, and the rematerialised loop over examples where the
kernel does not apply) equals XLA's `jax.nn.dot_product_attention`, and so does the accelerator branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dret.models import cpu
from dret.models.cpu import attention as cpu_attention, kernels
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
    monkeypatch.setattr(cpu, "active", lambda: False)
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask_bt), on_cpu, rtol=1e-5, atol=1e-6)


def _float64_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs):
    visible_bts = (kv_segments_bs[:, None, :] != 0) & (
        (q_segments_bt[:, :, None] == 0) | (q_segments_bt[:, :, None] == kv_segments_bs[:, None, :]))
    h = q_btnh.shape[-1]
    scores_bnts = np.where(visible_bts[:, None], np.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh) / h ** 0.5, -1e30)
    p_bnts = np.exp(scores_bnts - scores_bnts.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p_bnts / p_bnts.sum(-1, keepdims=True), v_bsnh)


def _segment_cases():
    """(q_segments [5, 37], kv_segments [5, 70]): key masks, with queries and keys of different lengths (one
    example with no real key); then packed rows (T = S = 37): several texts, padding, a segment id in two
    runs, a row of padding only."""
    key_mask = (np.arange(70)[None] < np.array([70, 1, 0, 33, 64])[:, None]).astype(np.int32)
    packed = np.array([[1] * 11 + [2] * 20 + [3] * 6,
                       [1] * 5 + [2] * 12 + [0] * 20,
                       [7] * 37,
                       [1] * 9 + [2] * 9 + [1] * 9 + [0] * 10,
                       [0] * 37], np.int32)
    return [(np.zeros((5, 37), np.int32), key_mask, 70), (packed, packed, 37)]


@pytest.mark.parametrize("h", cpu_attention.FUSED_HEAD_SIZES)
def test_fused_kernel_and_loop_equal_float64_attention(h):
    """Every compiled head size, row counts that leave partial row blocks, large scores; a query that sees no key
    averages all values (uniform weights, as the masked softmax gives). The kernel's error is that of float32."""
    assert kernels.attention_target() is not None
    rng = np.random.default_rng(h)
    for q_segments, kv_segments, s in _segment_cases():
        q_btnh = rng.standard_normal((5, 37, 3, h)) * 3
        k_bsnh, v_bsnh = (rng.standard_normal((5, s, 3, h)) for _ in range(2))
        want = _float64_attention(q_btnh, k_bsnh, v_bsnh, q_segments, kv_segments)
        args = (*(jnp.asarray(x, jnp.float32) for x in (q_btnh, k_bsnh, v_bsnh)), q_segments, kv_segments)
        np.testing.assert_allclose(jax.jit(cpu_attention.fused_attention)(*args), want, rtol=1e-5, atol=1e-5)
        loop = jax.jit(lambda *a: cpu_attention.blocked_attention(*a, False))(*args)
        np.testing.assert_allclose(loop, want, rtol=1e-5, atol=1e-5)


def test_packed_segments_on_the_accelerator_branch(monkeypatch):
    """The GPU / TPU branch builds the same [B, 1, T, S] visibility from segments."""
    rng = np.random.default_rng(3)
    q_segments, kv_segments, _ = _segment_cases()[1]
    q, k, v = (jnp.asarray(rng.standard_normal((5, 37, 2, 16)), jnp.float32) for _ in range(3))
    want = _float64_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), q_segments, kv_segments)
    monkeypatch.setattr(cpu, "active", lambda: False)
    np.testing.assert_allclose(dot_product_attention(q, k, v, kv_segments, q_segments), want, rtol=1e-5, atol=1e-5)


def test_cpu_float32_attention_runs_the_fused_kernel():
    q, k, v, mask_bt = _inputs()
    hlo = jax.jit(dot_product_attention).lower(q, k, v, mask_bt).as_text()
    assert kernels.ATTENTION_TARGET in hlo


def test_without_a_compiler_the_kernel_is_none_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("DRET_KERNEL_CACHE", str(tmp_path))
    warning = "could not build .*/cpu/attention.cc .*no C\\+\\+ compiler 'no-such-compiler'"
    with pytest.warns(UserWarning, match=warning):
        assert kernels.load(kernels.ATTENTION_SOURCE) is None
    assert not list(tmp_path.iterdir())
