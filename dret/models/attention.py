"""One attention entry point for every model: cuDNN on GPU in half precision; on CPU a fused C++ kernel
(`cpu_attention.cc`) or, where it does not apply, a cache-blocked loop; `jax.nn.dot_product_attention` elsewhere."""

import functools

import jax
import jax.numpy as jnp

from dret.models import cpu_kernels
from dret.models.blocks import map_examples
from dret.models.logical import batch_shards, per_batch_shard

CPU_STREAMS = 2  # examples per attention step on an unsharded CPU batch, one per core of a 2-core machine
FUSED_HEAD_SIZES = (16, 32, 64, 128)  # the head sizes cpu_attention.cc is compiled for


def _implementation(dtype) -> str | None:
    """cuDNN flash attention on GPU for half precision (5x XLA there); XLA's default elsewhere."""
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else None


def dot_product_attention(q_btnh, k_bsnh, v_bsnh, kv_segments_bs, q_segments_bt=None, *, is_causal: bool = False):
    """Softmax attention in float32, output in q's dtype. Query i sees key j when key j's segment is nonzero (a
    real token) and equals query i's segment, or query i's is 0. Packed rows hold several texts, one segment
    each; without `q_segments_bt` (all 0) `kv_segments_bs` is a plain key mask."""
    dtype = q_btnh.dtype
    b, t = q_btnh.shape[:2]
    kv_segments_bs = kv_segments_bs.astype(jnp.int32)
    q_segments_bt = jnp.zeros((b, t), jnp.int32) if q_segments_bt is None else q_segments_bt.astype(jnp.int32)
    if jax.default_backend() == "cpu":
        q_btnh, k_bsnh, v_bsnh = (x.astype(jnp.float32) for x in (q_btnh, k_bsnh, v_bsnh))
        fused = (not is_causal and q_btnh.shape[-1] in FUSED_HEAD_SIZES and k_bsnh.shape[2] == q_btnh.shape[2]
                 and cpu_kernels.attention_target() is not None)
        attend = per_batch_shard(_fused_attention, b) if fused else functools.partial(
            _blocked_attention, is_causal=is_causal)
        return attend(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs).astype(dtype)
    mask_b1ts = _visible(q_segments_bt, kv_segments_bs)[:, None]  # cuDNN takes a [B, 1, T, S] mask
    return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask_b1ts, is_causal=is_causal,
                                        implementation=_implementation(dtype)).astype(dtype)


def _visible(q_segments_bt, kv_segments_bs):
    """[B, T, S]: which keys each query sees (see `dot_product_attention`)."""
    q_bt1, kv_b1s = q_segments_bt[:, :, None], kv_segments_bs[:, None, :]
    return (kv_b1s != 0) & ((q_bt1 == 0) | (q_bt1 == kv_b1s))


@jax.custom_vjp
def _fused_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs):
    """Scores, softmax and values in one pass per (example, head) in `cpu_attention.cc` (float32); its gradient
    is the cache-blocked loop's."""
    out_type = jax.ShapeDtypeStruct(q_btnh.shape, jnp.float32)
    return jax.ffi.ffi_call(cpu_kernels.ATTENTION_TARGET, out_type)(q_btnh, k_bsnh, v_bsnh, q_segments_bt,
                                                                    kv_segments_bs)


def _fused_forward(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs):
    saved = (q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs)
    return _fused_attention(*saved), saved


def _fused_backward(saved, g_btnh):
    q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs = saved
    _, vjp = jax.vjp(lambda q, k, v: _blocked_attention(q, k, v, q_segments_bt, kv_segments_bs, False),
                     q_btnh, k_bsnh, v_bsnh)
    return (*vjp(g_btnh), None, None)


_fused_attention.defvjp(_fused_forward, _fused_backward)


def _attend(q_ctnh, k_csnh, v_csnh, q_segments_ct, kv_segments_cs, is_causal: bool):
    """Attention of a few examples, small enough that the [c, N, T, S] scores stay in cache."""
    q_cnth, k_cnsh, v_cnsh = (jnp.swapaxes(x, 1, 2) for x in (q_ctnh, k_csnh, v_csnh))
    scores_cnts = (q_cnth * q_cnth.shape[-1] ** -0.5) @ jnp.swapaxes(k_cnsh, -1, -2)
    keep_c1ts = _visible(q_segments_ct, kv_segments_cs)[:, None]
    if is_causal:
        t, s = scores_cnts.shape[-2:]
        keep_c1ts = keep_c1ts & jnp.tril(jnp.ones((t, s), bool), s - t)
    scores_cnts = jnp.where(keep_c1ts, scores_cnts, -1e30)
    unnormed_cnts = jnp.exp(scores_cnts - jax.lax.stop_gradient(scores_cnts.max(-1, keepdims=True)))
    return jnp.swapaxes((unnormed_cnts @ v_cnsh) / unnormed_cnts.sum(-1, keepdims=True), 1, 2)


def _blocked_attention(q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs, is_causal: bool):
    """XLA:CPU writes every [B, N, T, S] intermediate to memory and keeps them for the backward pass; looping
    over examples keeps them in cache and, with each step rematerialised, stores only q, k and v (flash-style).

    Unsharded, a step takes CPU_STREAMS examples as separate ops, which XLA:CPU runs side by side on its
    threads: per-example attention ops are too small to split well across cores (about 30% faster)."""
    attend = jax.checkpoint(lambda q, k, v, qs, ks: _attend(q, k, v, qs, ks, is_causal))
    args = (q_btnh, k_bsnh, v_bsnh, q_segments_bt, kv_segments_bs)
    if batch_shards() > 1:  # slicing a sharded batch would move data between devices
        return map_examples(attend, args, 1)

    def streams(*xs):
        return jnp.concatenate([attend(*(x[i:i + 1] for x in xs)) for i in range(xs[0].shape[0])])
    return map_examples(streams, args, CPU_STREAMS)
