"""One attention entry point for every model: cuDNN on GPU in half precision, XLA's
`jax.nn.dot_product_attention` elsewhere, and on CPU `dret.models.cpu.dot_product_attention` (a fused C++ kernel
or a cache-blocked loop)."""

import jax
import jax.numpy as jnp

from dret.models import cpu
from dret.models.segments import visible


def _implementation(dtype) -> str | None:
    """cuDNN flash attention on GPU for half precision (much faster than XLA's there); XLA's default elsewhere."""
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else None


def dot_product_attention(q_btnh, k_bsnh, v_bsnh, kv_segments_bs, q_segments_bt=None, *, is_causal: bool = False,
                          window: int | None = None):
    """Softmax attention in float32, output in q's dtype. Which keys a query sees follows its and their segments
    (`dret.models.segments`): packed rows hold several texts, one segment each; without `q_segments_bt` (all 0)
    `kv_segments_bs` is a plain key mask. A sliding `window` lets query i see only keys j with i - window < j <= i.
    k and v may have fewer heads than q, which share them in groups (grouped-query attention)."""
    dtype = q_btnh.dtype
    b, t = q_btnh.shape[:2]
    kv_segments_bs = kv_segments_bs.astype(jnp.int32)
    q_segments_bt = jnp.zeros((b, t), jnp.int32) if q_segments_bt is None else q_segments_bt.astype(jnp.int32)
    if cpu.active():
        return cpu.dot_product_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs,
                                         is_causal=is_causal, window=window).astype(dtype)
    mask_b1ts = visible(q_segments_bt, kv_segments_bs)[:, None]  # cuDNN takes a [B, 1, T, S] mask
    return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask_b1ts, is_causal=is_causal,
                                        local_window_size=None if window is None else (window - 1, 0),
                                        implementation=_implementation(dtype)).astype(dtype)
