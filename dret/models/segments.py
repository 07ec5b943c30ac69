"""Segment ids, the one rule for which tokens see each other: 0 is padding, any other id is one text of a
packed row. Query i sees key j when key j's segment is nonzero and equals query i's, or query i's is 0 (all-zero
query segments make the key segments a plain key mask)."""

import jax


def visible(q_segments_bt: jax.Array, kv_segments_bs: jax.Array) -> jax.Array:
    """[B, T, S] bool: which keys each query sees."""
    q_bt1, kv_b1s = q_segments_bt[:, :, None], kv_segments_bs[:, None, :]
    return (kv_b1s != 0) & ((q_bt1 == 0) | (q_bt1 == kv_b1s))
