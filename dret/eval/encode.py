"""Jitted, length-bucketed, data-parallel encoding of token ids: one compile per padded length.

Rows are sorted by length (longest first) and cut into batches; each batch is padded to a bucket length that fits
its longest row and sharded over all local devices (the 'data' axis). The first batch is timed: its compile and
its run price a compile in padded tokens, and `plan_lengths` then pads later batches up to an already compiled
length wherever that costs less than compiling a new one. The next batch is dispatched before the previous one is
copied back, so host padding overlaps device work.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dret.sharding import ActivationConstraint, batch_sharding, make_mesh

CACHED_DISPATCH_S = 0.05  # a first dispatch faster than this found its shape already compiled


@functools.cache
def data_mesh() -> jax.sharding.Mesh:
    """The training mesh layout over this process's devices, all on 'data': encoding is per-host."""
    return make_mesh(-1, 1, 1, devices=jax.local_devices())


def replicate(tree):
    """Put parameters on every local device (a no-op when they already are)."""
    return jax.device_put(tree, NamedSharding(data_mesh(), P()))


def batch_rules() -> ActivationConstraint:
    """Activation rules for tracing the encode forward: batch-sharded, so the model's CPU loops keep each
    example on its device (`dret.models.blocks`)."""
    return ActivationConstraint(data_mesh())


def plan_lengths(natural: list[int], rows: list[int], compile_tokens: float) -> list[int]:
    """Padded length per batch (batches longest first, `natural[i]` the smallest bucket that fits batch i, with
    `rows[i]` rows) that minimises padded tokens + compile_tokens per distinct length. The first length is fixed."""
    lengths = sorted(set(natural), reverse=True)  # candidate lengths, each one compile
    weight = {u: sum(r for n, r in zip(natural, rows) if n == u) for u in lengths}
    # best[j]: cost of the batches of lengths[j:] when lengths[j] is compiled; choice[j]: next compiled index
    best, choice = [0.0] * (len(lengths) + 1), [len(lengths)] * len(lengths)
    for j in range(len(lengths) - 1, -1, -1):
        padded, best[j] = 0.0, float("inf")
        for m in range(j + 1, len(lengths) + 1):
            padded += weight[lengths[m - 1]] * lengths[j]
            cost = compile_tokens + padded + best[m]
            if cost < best[j]:
                best[j], choice[j] = cost, m
    padded_to, j = {}, 0
    while j < len(lengths):
        for m in range(j, choice[j]):
            padded_to[lengths[m]] = lengths[j]
        j = choice[j]
    return [padded_to[n] for n in natural]


def _pad(ids: list[list[int]], rows: np.ndarray, b: int, t: int, pad_id: int, padding_side: str):
    ids_bt = np.full((b, t), pad_id, np.int32)
    mask_bt = np.zeros((b, t), np.int32)
    for i, r in enumerate(rows):
        n = len(ids[r])
        cols = slice(t - n, t) if padding_side == "left" else slice(0, n)
        ids_bt[i, cols] = ids[r]
        mask_bt[i, cols] = 1
    return ids_bt, mask_bt


def encode_ids(forward, ids: list[list[int]], *, out_dim: int, batch_size: int, buckets: list[int],
               pad_id: int, padding_side: str = "right", progress: bool = True) -> np.ndarray:
    """Token id lists -> float32 [N, out_dim] with `forward(ids_bt, mask_bt) -> [B, out_dim]` (jitted);
    pad tokens after each row's ids (right) or before them (left)."""
    n_dev = len(jax.local_devices())
    batch_size = -(-batch_size // n_dev) * n_dev
    sharding = batch_sharding(data_mesh())
    lengths = np.array([len(x) for x in ids], np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    natural = [next(b for b in buckets if b >= lengths[rows[0]]) for rows in batches]
    padded_lengths = natural
    out_nd = np.zeros((len(ids), out_dim), np.float32)
    pending = None
    bar = tqdm(total=len(ids), desc="encode", unit="text", disable=not progress or len(ids) <= batch_size,
               leave=False)
    for i, rows in enumerate(batches):
        # A short last batch is padded to a power of two (at least one row per device): few extra compiles.
        b = min(batch_size, max(n_dev, 1 << (len(rows) - 1).bit_length()))
        b = -(-b // n_dev) * n_dev
        t = padded_lengths[i]
        ids_bt, mask_bt = _pad(ids, rows, b, t, pad_id, padding_side)
        start = time.perf_counter()
        v_bd = forward(jax.device_put(ids_bt, sharding), jax.device_put(mask_bt, sharding))
        if i == 0 and len(batches) > 2:
            compile_s = time.perf_counter() - start
            v_bd.block_until_ready()
            token_s = max(time.perf_counter() - start - compile_s, 1e-9) / (b * t)
            if compile_s > CACHED_DISPATCH_S:
                padded_lengths = plan_lengths(natural, [len(r) for r in batches], compile_s / token_s)
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
