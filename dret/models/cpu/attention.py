"""CPU attention in float32: a fused C++ kernel (`attention.cc`) where it applies, else a cache-blocked loop over
examples."""

import os

import jax
import jax.numpy as jnp

from dret.models.cpu import kernels
from dret.models.cpu.blocks import batch_shards, map_examples, per_batch_shard
from dret.models.segments import visible

# Examples per attention step on an unsharded batch, one per core this process may run on (at most 8, where the
# unrolled per-example ops would outgrow the gain).
STREAMS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
FUSED_HEAD_SIZES = (16, 32, 64, 128)  # the head sizes attention.cc is compiled for


def dot_product_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs, *, is_causal: bool,
                          window: int | None = None):
    """`dret.models.attention.dot_product_attention` on CPU, in float32 (segments int32); grouped k/v heads are
    repeated to q's."""
    groups = q_btnh.shape[2] // k_bsnh.shape[2]
    q_btnh, k_bsnh, v_bsnh = (x.astype(jnp.float32) for x in (q_btnh, k_bsnh, v_bsnh))
    if groups > 1:
        k_bsnh, v_bsnh = (jnp.repeat(x, groups, axis=2) for x in (k_bsnh, v_bsnh))
    fused = (not is_causal and window is None and q_btnh.shape[-1] in FUSED_HEAD_SIZES
             and kernels.attention_target() is not None)
    if fused:
        return per_batch_shard(fused_attention, q_btnh.shape[0])(q_btnh, k_bsnh, v_bsnh, q_segments_bt,
                                                                 kv_segments_bs)
    return blocked_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs, is_causal, window)


@jax.custom_vjp
def fused_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs):
    """Scores, softmax and values in one pass per (example, head) in `attention.cc` (float32); its gradient
    is the cache-blocked loop's."""
    out_type = jax.ShapeDtypeStruct(q_btnh.shape, jnp.float32)
    return jax.ffi.ffi_call(kernels.ATTENTION_TARGET, out_type)(q_btnh, k_bsnh, v_bsnh, q_segments_bt,
                                                                kv_segments_bs)


def _fused_forward(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs):
    saved = (q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs)
    return fused_attention(*saved), saved


def _fused_backward(saved, g_btnh):
    q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs = saved
    _, vjp = jax.vjp(lambda q, k, v: blocked_attention(q, k, v, q_segments_bt, kv_segments_bs, False),
                     q_btnh, k_bsnh, v_bsnh)
    return (*vjp(g_btnh), None, None)


fused_attention.defvjp(_fused_forward, _fused_backward)


def _attend(q_ctnh, k_csnh, v_csnh, q_segments_ct, kv_segments_cs, is_causal: bool, window: int | None):
    """Attention of a few examples, small enough that the [c, N, T, S] scores stay in cache."""
    q_cnth, k_cnsh, v_cnsh = (jnp.swapaxes(x, 1, 2) for x in (q_ctnh, k_csnh, v_csnh))
    scores_cnts = (q_cnth * q_cnth.shape[-1] ** -0.5) @ jnp.swapaxes(k_cnsh, -1, -2)
    keep_c1ts = visible(q_segments_ct, kv_segments_cs)[:, None]
    if is_causal or window is not None:  # a window is causal too: i - window < j <= i
        t, s = scores_cnts.shape[-2:]
        keep_c1ts = keep_c1ts & jnp.tril(jnp.ones((t, s), bool), s - t)
        if window is not None:
            keep_c1ts = keep_c1ts & ~jnp.tril(jnp.ones((t, s), bool), s - t - window)
    scores_cnts = jnp.where(keep_c1ts, scores_cnts, -1e30)
    unnormed_cnts = jnp.exp(scores_cnts - jax.lax.stop_gradient(scores_cnts.max(-1, keepdims=True)))
    return jnp.swapaxes((unnormed_cnts @ v_cnsh) / unnormed_cnts.sum(-1, keepdims=True), 1, 2)


def blocked_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs, is_causal: bool,
                      window: int | None = None):
    """XLA:CPU writes every [B, N, T, S] intermediate to memory and keeps them for the backward pass; looping
    over examples keeps them in cache and, with each step rematerialised, stores only q, k and v (flash-style).

    Unsharded, a step takes STREAMS examples as separate ops, which XLA:CPU runs side by side on its threads:
    per-example attention ops are too small to split well across cores."""
    attend = jax.checkpoint(lambda q, k, v, qs, ks: _attend(q, k, v, qs, ks, is_causal, window))
    args = (q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs)
    if batch_shards() > 1:  # slicing a sharded batch would move data between devices
        return map_examples(attend, args, 1)

    def streams(*xs):
        return jnp.concatenate([attend(*(x[i:i + 1] for x in xs)) for i in range(xs[0].shape[0])])
    return map_examples(streams, args, STREAMS)
