"""Logical-axis sharding constraints on activations; a no-op unless a caller installs rules.

Model code names axes ('batch', 'length', 'embed'); the trainer maps them to its mesh (`dret.sharding`) for
the duration of a trace, so models never see a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

_RULES: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("activation_rules", default=None)


def constrain(x, names: tuple):
    """x with its dimensions laid out as the installed rules say for `names`."""
    rules = _RULES.get()
    return x if rules is None else rules(x, names)


def batch_shards() -> int:
    """How many ways the installed rules split the 'batch' axis (1 without rules)."""
    rules = _RULES.get()
    return 1 if rules is None else rules.batch_shards


def per_batch_shard(fn: Callable, b: int) -> Callable:
    """`fn` over [b, ...] arrays run on each batch shard by itself (for ops XLA cannot partition, such as
    foreign calls); `fn` unchanged when the installed rules do not split a batch of b."""
    rules = _RULES.get()
    if rules is None or rules.batch_shards == 1 or b % rules.batch_shards:
        return fn
    return rules.per_batch_shard(fn)


@contextlib.contextmanager
def activation_rules(rules: Callable | None):
    """Install `rules(x, names) -> x`, which also has `batch_shards` and `per_batch_shard(fn)`, while tracing
    (None: no constraints)."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)
