"""Jitted, length-bucketed, data-parallel encoding of token ids: one compile per bucket length.

Rows are sorted by length (longest first) and cut into batches; each batch is padded to the smallest bucket
length that fits its longest row and sharded over all local devices (a 1-D 'data' mesh). The next batch is
dispatched before the previous one is copied back, so host padding overlaps device work.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm


@functools.cache
def data_mesh() -> jax.sharding.Mesh:
    """1-D mesh over this process's devices: encoding is per-host, batches split over 'data'."""
    return jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))


def replicate(tree):
    """Put parameters on every local device (a no-op when they already are)."""
    return jax.device_put(tree, NamedSharding(data_mesh(), P()))


def _batches(lengths: np.ndarray, batch_size: int, buckets: list[int]):
    """(row indices, padded length) per batch, rows sorted longest first."""
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        yield rows, next(b for b in buckets if b >= lengths[rows[0]])


def encode_ids(forward, ids: list[list[int]], *, out_dim: int, batch_size: int, buckets: list[int],
               pad_id: int, padding_side: str = "right", progress: bool = True) -> np.ndarray:
    """Token id lists -> float32 [N, out_dim] with `forward(ids_bt, mask_bt) -> [B, out_dim]` (jitted);
    pad tokens after each row's ids (right) or before them (left)."""
    n_dev = len(jax.local_devices())
    batch_size = -(-batch_size // n_dev) * n_dev
    sharding = NamedSharding(data_mesh(), P("data"))
    lengths = np.array([len(x) for x in ids], np.int64)
    out_nd = np.zeros((len(ids), out_dim), np.float32)
    pending = None
    bar = tqdm(total=len(ids), desc="encode", unit="text", disable=not progress or len(ids) <= batch_size,
               leave=False)
    for rows, t in _batches(lengths, batch_size, buckets):
        # A short last batch is padded to a power of two (at least one row per device): few extra compiles.
        b = min(batch_size, max(n_dev, 1 << (len(rows) - 1).bit_length()))
        b = -(-b // n_dev) * n_dev
        ids_bt = np.full((b, t), pad_id, np.int32)
        mask_bt = np.zeros((b, t), np.int32)
        for i, r in enumerate(rows):
            cols = slice(t - lengths[r], t) if padding_side == "left" else slice(0, lengths[r])
            ids_bt[i, cols] = ids[r]
            mask_bt[i, cols] = 1
        v_bd = forward(jax.device_put(ids_bt, sharding), jax.device_put(mask_bt, sharding))
        if pending is not None:
            _fetch(out_nd, *pending, bar)
        pending = (rows, v_bd)
    if pending is not None:
        _fetch(out_nd, *pending, bar)
    bar.close()
    return out_nd


def _fetch(out_nd: np.ndarray, rows: np.ndarray, v_bd: jax.Array, bar) -> None:
    out_nd[rows] = np.asarray(v_bd)[:len(rows)]
    bar.update(len(rows))
