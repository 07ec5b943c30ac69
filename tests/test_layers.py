"""`run_layers`, the layer stack every model family calls: on CPU (blocked inference, the CPU attention) it gives
what the accelerator path gives (`dret.models.cpu.active` mocked False), in inference and in a training forward
with dropout and rematerialisation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dret.models import cpu
from dret.models.attention import dot_product_attention
from dret.models.layers import run_layers

B, T, D, HEADS = 8, 256, 32, 2  # 256-token rows: CPU inference runs blocks of 4 rows


class ToyLayer(nnx.Module):
    """A layer as another model family would write one: `layer(x_btd, segments_bt, positions_bt, dropout_rng)`
    (positions enter as a rotary family's would: per token, so the CPU blocks must carry them)."""

    def __init__(self, is_causal: bool, rngs: nnx.Rngs):
        self.is_causal = is_causal
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
        self.out = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x_btd, segments_bt, positions_bt, dropout_rng):
        b, t, _ = x_btd.shape
        q_btnh, k_btnh, v_btnh = jnp.split(self.qkv(x_btd).reshape(b, t, 3 * HEADS, D // HEADS), 3, axis=2)
        h_btd = self.out(dot_product_attention(q_btnh, k_btnh, v_btnh, segments_bt, segments_bt,
                                               is_causal=self.is_causal).reshape(b, t, D))
        if dropout_rng is not None:
            h_btd = jnp.where(jax.random.bernoulli(dropout_rng, 0.9, h_btd.shape), h_btd / 0.9, 0)
        return x_btd + jnp.tanh(h_btd) * jnp.cos(positions_bt)[..., None]


def _inputs():
    """x [B, T, D], segments and positions [B, T]: packed rows with padding in rows 0-3, then empty rows (segment 0
    throughout) that fill the batch, one CPU block of them."""
    rng = np.random.default_rng(0)
    lengths = [(100, 156), (256,), (30, 40, 50, 7), (120, 100)] + [()] * 4
    segments, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for r, row in enumerate(lengths):
        segments[r, :sum(row)] = np.repeat(np.arange(1, len(row) + 1), row)
        positions[r, :sum(row)] = np.concatenate([np.arange(n) for n in row]) if row else []
    return jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32), jnp.asarray(segments), jnp.asarray(positions)


def _layers(is_causal):
    rngs = nnx.Rngs(0)
    return nnx.List([ToyLayer(is_causal, rngs) for _ in range(3)])


@pytest.mark.parametrize("is_causal", [False, True])  # the fused kernel, the blocked loop
def test_inference_on_cpu_equals_the_accelerator_path(monkeypatch, is_causal):
    layers, (x_btd, segments_bt, positions_bt) = _layers(is_causal), _inputs()

    def forward(x, s):
        return run_layers(layers, x, s, positions_bt, None, remat=False)

    def traced() -> str:  # a new function each time: make_jaxpr caches traces by function
        return str(jax.make_jaxpr(lambda x, s: forward(x, s))(x_btd, segments_bt))
    on_cpu = np.asarray(forward(x_btd, segments_bt))
    assert "cond" in traced()  # blocks, skipped when empty
    np.testing.assert_array_equal(on_cpu[4:], x_btd[4:])  # a block of empty rows passes through
    monkeypatch.setattr(cpu, "active", lambda: False)
    assert "cond" not in traced()
    np.testing.assert_allclose(forward(x_btd, segments_bt)[:4], on_cpu[:4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_training_forward_and_gradients_on_cpu_equal_the_accelerator_path(monkeypatch, is_causal):
    """Dropout per layer from fold_in(rng, i); with remat the values and gradients are those without."""
    layers, (x_btd, segments_bt, positions_bt) = _layers(is_causal), _inputs()
    weights_btd = jnp.cos(jnp.arange(x_btd.size).reshape(x_btd.shape))

    def loss_and_grads(remat):
        def loss(layers):
            h_btd = run_layers(layers, x_btd, segments_bt, positions_bt, jax.random.key(1), remat=remat)
            return (h_btd * weights_btd).sum(), h_btd
        (_, h_btd), grads = nnx.value_and_grad(loss, has_aux=True)(layers)
        return h_btd, jax.tree.leaves(nnx.to_pure_dict(grads))

    def checkpoints(remat) -> int:  # rematerialised calls in the traced forward
        forward = lambda x: run_layers(layers, x, segments_bt, positions_bt, jax.random.key(1),  # noqa: E731
                                       remat=remat)
        return len(re.findall(r"= (?:remat\w*|checkpoint)\[", str(jax.make_jaxpr(forward)(x_btd))))

    want_h, want_grads = loss_and_grads(remat=False)
    monkeypatch.setattr(cpu, "active", lambda: False)
    assert (checkpoints(False), checkpoints(True)) == (0, len(layers))
    for remat in (False, True):
        h, grads = loss_and_grads(remat)
        np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    h, grads = loss_and_grads(remat=True)
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
