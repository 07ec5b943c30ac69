"""Loops over small groups of examples that keep batch sharding: XLA:CPU then keeps a group's intermediates
in cache instead of writing batch-sized temporaries to memory."""

import math

import jax
import jax.numpy as jnp

from dret.models.logical import installed_rules


def batch_shards() -> int:
    """How many ways the installed rules split the 'batch' axis (1 without rules)."""
    rules = installed_rules()
    return 1 if rules is None else rules.batch_shards


def per_batch_shard(fn, b: int):
    """`fn` over [b, ...] arrays run on each batch shard by itself (for ops XLA cannot partition, such as
    foreign calls); `fn` unchanged when the installed rules do not split a batch of b."""
    rules = installed_rules()
    if rules is None or rules.batch_shards == 1 or b % rules.batch_shards:
        return fn
    return rules.per_batch_shard(fn)


def _shards_used(b: int) -> int:
    return batch_shards() if b % batch_shards() == 0 else 1


def examples_per_step(b: int, examples_per_shard: int) -> int:
    """Examples per loop step: `examples_per_shard` of each batch shard, or fewer when that does not divide them."""
    shards = _shards_used(b)
    return shards * math.gcd(b // shards, examples_per_shard)


def map_examples(fn, args: tuple, examples_per_shard: int):
    """`fn(*args)` computed step by step over groups of examples; every arg and output is [B, ...].

    A step takes `examples_per_step` examples: the next few consecutive examples of every batch shard, so each
    example stays on its shard's device and a step's rows are contiguous in memory.
    """
    b = args[0].shape[0]
    shards = _shards_used(b)
    per_shard = examples_per_step(b, examples_per_shard) // shards
    steps = b // shards // per_shard
    if steps == 1:
        return fn(*args)

    def to_steps(x):  # [B, ...] -> [steps, shards * per_shard, ...]; shard d's rows j*per_shard.. go to step j
        x = jnp.swapaxes(x.reshape(shards, steps, per_shard, *x.shape[1:]), 0, 1)
        return x.reshape(steps, shards * per_shard, *x.shape[3:])

    def from_steps(y):
        y = jnp.swapaxes(y.reshape(steps, shards, per_shard, *y.shape[2:]), 0, 1)
        return y.reshape(b, *y.shape[3:])

    out = jax.lax.map(lambda xs: fn(*xs), tuple(to_steps(x) for x in args))
    return jax.tree.map(from_steps, out)
