"""Parameterised pieces every family builds from: Linear layers naming logical axes with float32 results, LayerNorm
in float32, and torch's exact GELU."""

import jax
import jax.numpy as jnp
from flax import nnx


def dense(n_in, n_out, axes, dtype, param_dtype, rngs, use_bias: bool = True) -> nnx.Linear:
    """Linear [n_in -> n_out], kernel on logical `axes` (the bias on axes[1:]), N(0, 0.02) init, float32 results."""
    return nnx.Linear(
        n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, preferred_element_type=jnp.float32,
        rngs=rngs, kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]),
    )


def layer_norm(n, eps, param_dtype, rngs) -> nnx.LayerNorm:
    """LayerNorm over n features, computed in float32 with torch's two-pass variance."""
    return nnx.LayerNorm(
        n, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
    )


def gelu(x):
    """Exact GELU in torch's form, x/2 (1 + erf(x/sqrt 2)): faster on CPU than jax.nn.gelu's erfc form, and closer
    to torch for very negative x."""
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))
