"""Loops over small groups of examples that keep batch sharding: XLA:CPU then keeps a group's intermediates
in cache instead of writing batch-sized temporaries to memory."""

import math

import jax
import jax.numpy as jnp

from dret.models.logical import batch_shards


def examples_per_step(b: int, examples_per_shard: int) -> int:
    """Examples per loop step: `examples_per_shard` of each batch shard, or fewer when that does not divide them."""
    shards = batch_shards() if b % batch_shards() == 0 else 1
    return shards * math.gcd(b // shards, examples_per_shard)


def map_examples(fn, args: tuple, examples_per_shard: int):
    """`fn(*args)` computed step by step over groups of examples; every arg and output is [B, ...].

    A group takes `examples_per_step` examples, strided (examples j, j + steps, ...), so every example stays on
    its batch shard's device.
    """
    b = args[0].shape[0]
    per_step = examples_per_step(b, examples_per_shard)
    steps = b // per_step
    if steps == 1:
        return fn(*args)

    def to_steps(x):  # [B, ...] -> [steps, per_step, ...]; row s*steps + j goes to step j
        return jnp.swapaxes(x.reshape(per_step, steps, *x.shape[1:]), 0, 1)

    out = jax.lax.map(lambda xs: fn(*xs), tuple(to_steps(x) for x in args))
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(b, *y.shape[2:]), out)
