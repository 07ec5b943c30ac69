"""Jitted, packed, data-parallel encoding of token ids: texts share rows, so nothing is padded and one shape
is compiled.

Texts are packed into rows of `row_tokens` tokens (longest first, gaps filled with the shortest texts), each text
its own attention segment with positions from 0, and rows are cut into batches sharded over all local devices
(the 'data' axis). The unused tail of a row is one more segment that no text pools; a row with no text is
segment 0 throughout, which the model skips. The next batch is dispatched before the previous one is copied
back, so host packing overlaps device work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dret.sharding import ActivationConstraint, batch_sharding, make_mesh

MIN_ROW_TOKENS = 16
TOKENS_PER_TEXT_SLOT = 8  # a row has row_tokens // 8 text slots: shorter texts leave part of a row empty


@functools.cache
def data_mesh() -> jax.sharding.Mesh:
    """The training mesh layout over this process's devices, all on 'data': encoding is per-host."""
    return make_mesh(-1, 1, 1, devices=jax.local_devices())


def replicate(tree):
    """Put parameters on every local device (a no-op when they already are)."""
    return jax.device_put(tree, NamedSharding(data_mesh(), P()))


def batch_rules() -> ActivationConstraint:
    """Activation rules for tracing the encode forward: batch-sharded, so the model's CPU loops keep each
    example on its device (`dret.models.cpu`)."""
    return ActivationConstraint(data_mesh())


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_length(lengths: np.ndarray, target: int, n_dev: int) -> int:
    """Tokens per packed row: `target` (or the power of two that holds the longest text, if longer); a small
    input gets the power of two (at least MIN_ROW_TOKENS) that spreads it over the devices, so it compiles small."""
    longest = _pow2_at_least(max(int(lengths.max()), MIN_ROW_TOKENS))
    spread = _pow2_at_least(-(-int(lengths.sum()) // n_dev))
    return max(longest, min(target, spread))


def pack(lengths: np.ndarray, row_tokens: int, texts_per_row: int) -> list[np.ndarray]:
    """Text indices per row, in O(N): each row takes the longest texts left while they fit, then the shortest.
    Every text fits (`row_tokens` >= the longest)."""
    order = np.argsort(-lengths, kind="stable")
    head, tail = 0, len(order) - 1
    rows = []
    while head <= tail:
        row, free = [], row_tokens
        while head <= tail and len(row) < texts_per_row and lengths[order[head]] <= free:
            row.append(order[head])
            free -= lengths[order[head]]
            head += 1
        while head <= tail and len(row) < texts_per_row and lengths[order[tail]] <= free:
            row.append(order[tail])
            free -= lengths[order[tail]]
            tail -= 1
        rows.append(np.array(row))
    return rows


@dataclasses.dataclass
class PackedBatch:
    """One batch of packed rows [R, L]; text k of row r lands in slot k (slot `texts_per_row` = no text)."""
    ids_rl: np.ndarray
    slots_rl: np.ndarray  # the token's slot in its row; the segment is slot + 1 (0 throughout an empty row)
    positions_rl: np.ndarray  # the token's position in its text
    lengths_rl: np.ndarray  # the length of the token's text (0 in a row's unused tail)
    texts: list[np.ndarray]  # per row: input index of the text in each slot

    @classmethod
    def build(cls, ids: list[list[int]], rows: list[np.ndarray], n_rows: int, row_tokens: int, texts_per_row: int,
              pad_id: int) -> "PackedBatch":
        shape = (n_rows, row_tokens)
        batch = cls(np.full(shape, pad_id, np.int32), np.full(shape, texts_per_row, np.int32),
                    np.zeros(shape, np.int32), np.zeros(shape, np.int32), rows)
        for r, row in enumerate(rows):
            start = 0
            for k, i in enumerate(row):
                n = len(ids[i])
                cols = slice(start, start + n)
                batch.ids_rl[r, cols] = ids[i]
                batch.slots_rl[r, cols] = k
                batch.positions_rl[r, cols] = np.arange(n)
                batch.lengths_rl[r, cols] = n
                start += n
        return batch


def encode_ids(forward, ids: list[list[int]], *, out_dim: int, tokens_per_batch: int, row_tokens: int,
               pad_id: int, progress: bool = True) -> np.ndarray:
    """Token id lists -> float32 [N, out_dim] with `forward(ids_rl, slots_rl, positions_rl, lengths_rl,
    texts_per_row=K) -> [R, K, out_dim]` (jitted). Rows hold up to `row_tokens` tokens (a target, see
    `row_length`); a batch holds about `tokens_per_batch`."""
    n_dev = len(jax.local_devices())
    lengths = np.array([len(x) for x in ids], np.int64)
    row_tokens = row_length(lengths, row_tokens, n_dev)
    texts_per_row = max(1, row_tokens // TOKENS_PER_TEXT_SLOT)
    rows = pack(lengths, row_tokens, texts_per_row)
    rows_per_batch = -(-max(1, tokens_per_batch // row_tokens) // n_dev) * n_dev
    sharding = batch_sharding(data_mesh())
    out_nd = np.zeros((len(ids), out_dim), np.float32)
    pending = None
    bar = tqdm(total=len(ids), desc="encode", unit="text", disable=not progress or len(rows) <= rows_per_batch,
               leave=False)
    for s in range(0, len(rows), rows_per_batch):
        batch_rows = rows[s:s + rows_per_batch]
        # A short batch is padded with empty rows, which the model skips on CPU: to the full batch (its compiled
        # shape) when at least a quarter full, else to a power of two (a multiple of the devices).
        n_rows = rows_per_batch if 4 * len(batch_rows) >= rows_per_batch else min(
            rows_per_batch, -(-_pow2_at_least(len(batch_rows)) // n_dev) * n_dev)
        batch = PackedBatch.build(ids, batch_rows, n_rows, row_tokens, texts_per_row, pad_id)
        arrays = (batch.ids_rl, batch.slots_rl, batch.positions_rl, batch.lengths_rl)
        v_rkd = forward(*(jax.device_put(x, sharding) for x in arrays), texts_per_row=texts_per_row)
        if pending is not None:
            _fetch(out_nd, *pending, bar)
        pending = (batch.texts, v_rkd)
    if pending is not None:
        _fetch(out_nd, *pending, bar)
    bar.close()
    return out_nd


def _fetch(out_nd: np.ndarray, texts: list[np.ndarray], v_rkd: jax.Array, bar) -> None:
    v_rkd = np.asarray(v_rkd)
    for r, row in enumerate(texts):
        out_nd[row] = v_rkd[r, :len(row)]
    bar.update(sum(len(row) for row in texts))
