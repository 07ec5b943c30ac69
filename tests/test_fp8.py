"""fp8=True: the FP8 dense against bf16 and float32, a tiny training run (SFT and LoRA) against bf16, the config check.

Tolerances. e4m3 keeps 3 mantissa bits: rounding to nearest moves each operand element by at most 2^-4 of itself
(e5m2, the gradient: 2^-3). A product of two rounded elements is then off by at most 2^-4 + 2^-4 + 2^-8 ~ 0.13 of
itself; over a sum of k random-signed products those errors are independent, so the result's error is about
0.13 / sqrt(3) (uniform rounding) ~ 0.07 of the sum's own scale, far under the worst case of 0.13. The tests allow
0.1 (forward, input gradient) and 0.15 (gradients through the e5m2 gradient) of the float32 result's norm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dret.errors import DretError
from dret.models import fp8
from dret.models.blocks import dense
from tests.test_train import flat, step_history
from tests.train_util import new_run, tiny_config


def _relative(a, b):
    return float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))


def test_quantised_values_are_fp8_at_a_power_of_two_scale():
    x = jax.random.normal(jax.random.key(0), (64, 96), jnp.bfloat16) * 3e-3
    s = fp8.scale(x, fp8.E4M3)
    assert np.frexp(float(s))[0] == 0.5 and 224 < float(jnp.abs(x).max() / s) <= 448  # s = 2^k
    q = fp8.quantised(x, fp8.E4M3)
    np.testing.assert_array_equal((q / s).astype(fp8.E4M3).astype(jnp.float32), (q / s).astype(jnp.float32))
    assert float(jnp.max(jnp.abs(q - x) / jnp.abs(x))) <= 2.0 ** -4  # normal range: half an ulp of 3 bits
    assert float(fp8.scale(jnp.zeros(3, jnp.bfloat16), fp8.E4M3)) == 1.0


def test_fp8_dense_forward_and_gradients_track_float32():
    """nnx.Linear through fp8.dot_general against the same layer in bf16 and in float32, on [4, 16, 256] inputs."""
    layer = dense(256, 128, ("embed", "mlp"), jnp.bfloat16, jnp.float32, nnx.Rngs(0))
    layer.bias.set_value(jax.random.normal(jax.random.key(1), (128,)) * 0.02)
    x = jax.random.normal(jax.random.key(2), (4, 16, 256))
    target = jax.random.normal(jax.random.key(3), (4, 16, 128))

    def run(dtype, use_fp8):
        graphdef, params = nnx.split(layer)
        model = nnx.merge(graphdef, params)
        model.dtype = dtype
        if use_fp8:
            fp8.enable(model)
        graphdef, params = nnx.split(model)

        def loss(params, x):
            y = nnx.merge(graphdef, params)(x)
            return jnp.sum(y * target), y

        (_, y), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, g_params["kernel"].get_value(), g_params["bias"].get_value(), g_x

    f32, bf16, f8 = run(jnp.float32, False), run(jnp.bfloat16, False), run(jnp.bfloat16, True)
    assert f8[0].dtype == jnp.float32
    for name, a, b, ref, tolerance in zip(("y", "d kernel", "d bias", "d x"), f8, bf16, f32, (0.1, 0.15, 0.15, 0.15)):
        assert _relative(b, ref) < 0.02, name  # bf16 alone: 8 bits
        assert 1e-3 < _relative(a, ref) < tolerance, name  # FP8 did round, within the bound


def _losses(tmp_path, name, **overrides):
    """Per-step losses of 3 steps of the tiny bf16 run on one device (the matmuls under test are per device; one
    device compiles fastest), and the trained LoRA adapters (flat; {} under sft)."""
    run = new_run(tiny_config(tmp_path / name, bf16=True, max_steps=3, per_device_train_batch_size=8, **overrides),
                  devices=jax.devices()[:1])
    state, history = step_history(run, 3)
    losses = np.array([float(metrics["loss"]) for metrics in history])
    return losses, {p: v for p, v in flat(state.params).items() if "lora" in str(p[-1])}


def test_tiny_fp8_lora_run_tracks_bf16(tmp_path):
    """Three LoRA steps of the tiny run (qwix's adapters on the FP8 Linear layers; sft's dense path is the test
    above): finite losses within 5% of bf16's (a contrastive loss near log(batch) moves by a few hundredths when
    every matmul's operands are rounded to 3 bits; a missing layer or a wrong scale moves it by far more), and the
    adapters train."""
    bf16, _ = _losses(tmp_path, "bf16", fine_tune_type="lora")
    with_fp8, adapters = _losses(tmp_path, "fp8", fine_tune_type="lora", fp8=True)
    assert np.isfinite(with_fp8).all()
    np.testing.assert_allclose(with_fp8, bf16, rtol=0.05)
    assert not np.array_equal(with_fp8, bf16)  # the FP8 path ran
    b = [v for p, v in adapters.items() if str(p[-1]).endswith("lora_b")]  # B starts at zero
    assert b and all(np.abs(v).max() > 0 for v in b)


def test_fp8_needs_bf16(tmp_path):
    from dret.config_check import validate

    for overrides in ({}, {"fp16": True}):
        with pytest.raises(DretError, match="fp8=True needs bf16=True"):
            validate(tiny_config(tmp_path, fp8=True, **overrides))
