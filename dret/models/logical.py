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


@contextlib.contextmanager
def activation_rules(rules: Callable | None):
    """Install `rules(x, names) -> x`, which also has `batch_shards`, while tracing (None: no constraints)."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)
