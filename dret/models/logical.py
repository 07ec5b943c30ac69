"""Logical-axis sharding constraints on activations; a no-op unless a caller installs rules.

Model code names axes ('batch', 'length', 'embed'); the trainer maps them to its mesh (`dret.sharding`) for
the duration of a trace, so models never see a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

_RULES: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("activation_rules", default=None)


def installed_rules() -> Callable | None:
    """The rules installed by `activation_rules` (None outside it)."""
    return _RULES.get()


def constrain(x, names: tuple):
    """x with its dimensions laid out as the installed rules say for `names`."""
    rules = installed_rules()
    return x if rules is None else rules(x, names)


@contextlib.contextmanager
def activation_rules(rules: Callable | None):
    """Install `rules(x, names) -> x`, which also has `batch_shards` and `per_batch_shard(fn)` (for the CPU loops
    of `dret.models.cpu`), while tracing (None: no constraints)."""
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)
