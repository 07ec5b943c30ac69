"""One attention entry point for every model: `jax.nn.dot_product_attention`, cuDNN on GPU."""

import jax
import jax.numpy as jnp


def _implementation(dtype) -> str | None:
    """cuDNN flash attention on GPU for half precision (5x XLA there); XLA's default elsewhere."""
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else None


def dot_product_attention(q_btnh, k_bsnh, v_bsnh, key_mask_bs, *, is_causal: bool = False):
    """Softmax attention with padded keys masked out; softmax in float32, output in q's dtype."""
    mask_b11s = key_mask_bs[:, None, None, :].astype(bool)
    dtype = q_btnh.dtype
    if dtype == jnp.float16 and jax.default_backend() == "cpu":  # XLA:CPU has no f16 x f16 -> f32 dot
        q_btnh, k_bsnh, v_bsnh = (x.astype(jnp.float32) for x in (q_btnh, k_bsnh, v_bsnh))
    return jax.nn.dot_product_attention(
        q_btnh, k_bsnh, v_bsnh, mask=mask_b11s, is_causal=is_causal,
        implementation=_implementation(dtype)).astype(dtype)
