"""Embedding rows for tokens added beyond a checkpoint's vocabulary (the special tokens a prompt format needs, e.g.
bge-en-icl's `<query>`, LLARA's `<s1>`): a Param of their own beside the base table, so the base rows stay what the
checkpoint holds (frozen under LoRA and bitfit) and only the new rows train; one table again on export.

A family whose config has `added_tokens` n > 0 keeps its base `nnx.Embed` (path `VOCAB_TABLE`, a family constant)
and the new rows [n, D] as `NAME` in the module holding that Embed; ids >= vocab_size read the new rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

NAME = "added_embeddings"


def rows_path(vocab_table: tuple) -> tuple:
    """The flat state path of the added rows, beside the Embed whose table is at `vocab_table`."""
    return (*vocab_table[:-2], NAME)


def is_added(path, value) -> bool:
    """nnx filter: the added rows."""
    return isinstance(value, nnx.Param) and path[-1] == NAME


def initial_rows(embedding_vd, n: int):
    """[n, D] new rows, each the mean of the base rows (computed in float32, in the table's dtype): transformers 5's
    `resize_token_embeddings` default (mean_resizing) draws around this mean with covariance 1e-9 x the rows'; we
    take the mean itself, so the rows are deterministic."""
    mean_d = jnp.mean(embedding_vd.astype(jnp.float32), axis=0)
    return jnp.broadcast_to(mean_d, (n, embedding_vd.shape[1])).astype(embedding_vd.dtype)


def new_rows(embed: nnx.Embed, n: int) -> nnx.Param | None:
    """The Param of `n` added rows for `embed` (None for none), laid out on the logical axes of a vocab table."""
    if not n:
        return None
    return nnx.Param(initial_rows(embed.embedding[...], n), out_sharding=("vocab", "embed"))


def lookup(embed: nnx.Embed, rows: nnx.Param | None, ids_bt):
    """Token embeddings [B, T, D] in the Embed's dtype: ids < vocab_size from the base table, the others from the
    added rows (both gathered, one selected: no concatenated table per step)."""
    if rows is None:
        return embed(ids_bt)
    v = embed.num_embeddings
    added_bt = ids_bt >= v
    base_btd = embed(jnp.where(added_bt, 0, ids_bt))
    new_btd = jnp.take(rows[...].astype(base_btd.dtype), jnp.where(added_bt, ids_bt - v, 0), axis=0)
    return jnp.where(added_bt[..., None], new_btd, base_btd)


def merged(flat: dict, text: dict, vocab_table: tuple) -> tuple[dict, dict]:
    """(flat params, the transformer's HF config `text`) with the added rows appended to the base table, as one
    exported model holds them: vocab_size grown by `added_tokens`, which the config no longer names. Unchanged
    without added rows."""
    n = text.get("added_tokens", 0)
    if not n:
        return flat, text
    rows = flat[rows_path(vocab_table)].get_value()
    table = flat[vocab_table].get_value()
    flat = {p: v for p, v in flat.items() if p != rows_path(vocab_table)}
    flat[vocab_table] = nnx.Param(jnp.concatenate([table, rows.astype(table.dtype)]))
    text = {k: v for k, v in text.items() if k != "added_tokens"}
    return flat, {**text, "vocab_size": text["vocab_size"] + n}
