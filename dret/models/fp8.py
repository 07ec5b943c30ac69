"""FP8 matmuls for training (`fp8=True`): the `dot_general` every Linear layer gets (`enable`); embeddings, norms,
attention and the loss are unchanged.

Each operand is rounded to float8_e4m3fn values at a per-tensor scale and handed to a plain dot in its compute dtype
(bf16), whose bf16 result is cast to the layer's float32; the backward rounds the incoming gradient to float8_e5m2
values the same way, so all three matmuls (forward, input and weight gradients) see FP8 operands. XLA:GPU rewrites
a dot whose operands are `convert(f8) * scale` into a cuBLASLt FP8 GEMM (float32 accumulation) on Hopper; XLA:CPU
computes the same numbers in bf16. Scales are powers of two, so dequantising to bf16 is exact.

Why this quantise-dequantise form rather than a custom_vjp around an FP8 dot (flax's `fp8_scaled_dot_general`):
qwix LoRA intercepts the `jax.lax.dot_general` inside each Linear and adds its adapters from that call's operands;
here they are the layer's inputs at their real scale, and no custom_vjp closes over the adapters.
Scaling is current (each tensor's amax in this step), not delayed (an amax history per tensor from earlier steps,
Transformer Engine's default, which saves one pass over each tensor): no state enters the train state or
checkpoints, and a spike in this step cannot overflow a scale from the past.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import fp8_ops

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


def scale(x, q_dtype):
    """The power of two s that puts amax(|x|) / s in q_dtype's top binade (1 for an all-zero or non-finite x)."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    exponent = jnp.clip(jnp.floor(jnp.log2(fp8_ops.get_fp8_max(q_dtype, jnp.float32) / amax)), -126, 126)
    return jnp.where((amax > 0) & jnp.isfinite(amax), jnp.ldexp(jnp.float32(1), -exponent.astype(jnp.int32)), 1.0)


def quantised(x, q_dtype):
    """x rounded to q_dtype values at its current scale, in x's dtype."""
    return fp8_ops.qdq(x, q_dtype, scale(x, q_dtype), x.dtype)


@jax.custom_vjp
def _operand(x):
    """x in float8_e4m3fn values; the gradient passes straight through."""
    return quantised(x, E4M3)


_operand.defvjp(lambda x: (quantised(x, E4M3), None), lambda _, g: (g,))


@jax.custom_vjp
def _result(y):
    """y itself; its gradient in float8_e5m2 values (both backward matmuls read it)."""
    return y


_result.defvjp(lambda y: (y, None), lambda _, g: (quantised(g, E5M2),))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """`jax.lax.dot_general` on FP8 values of both operands, FP8 gradient; the GEMM's result is in the operands'
    dtype, then cast to preferred_element_type (nnx.Linear's `dot_general` argument)."""
    y = jax.lax.dot_general(_operand(lhs), _operand(rhs), dimension_numbers, precision=precision,
                            out_sharding=out_sharding)
    return _result(y).astype(preferred_element_type or y.dtype)


def enable(model: nnx.Module) -> nnx.Module:
    """`model` with every nnx.Linear computing through `dot_general` (static: the train state does not change)."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Linear):
            module.dot_general = dot_general
    return model
