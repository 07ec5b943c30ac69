"""Sentence vectors from hidden states: pooling weights, Matryoshka truncation, L2 normalisation (written once
here; the model, the training step, the losses and the MTEB adapter all use it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLING_METHODS = ("cls", "mean", "last", "last_8", "latent")  # latent: the mean of an NV-Embed output


def pool_weights(positions_bt: jax.Array, lengths_bt: jax.Array, method: str,
                 starts_bt: jax.Array | None = None) -> jax.Array:
    """Each token's weight [B, T] in its text's vector, from its position in the text and the text's length
    (0 where no text is): cls the first token, mean all, last the last, last_8 the last 8 equally (a text of
    fewer than 8 tokens: the mean of all of them).

    starts_bt (broadcastable to [B, T], None = 0): the text's first pooled position. Tokens before it (NV-Embed's
    instruction, `dret.prompts.instruction_length`) get weight 0 and the method reads the text from there on. A
    text with nothing from its start on pools no token (a zero vector); the data and `check_instruction` keep
    instructions shorter than the texts, so this does not happen in training or evaluation.
    """
    real_bt = positions_bt < lengths_bt
    if starts_bt is not None:
        real_bt &= positions_bt >= starts_bt
        positions_bt, lengths_bt = positions_bt - starts_bt, lengths_bt - starts_bt
    n_bt = jnp.maximum(lengths_bt, 1).astype(jnp.float32)
    if method == "cls":
        w_bt = positions_bt == 0
    elif method in ("mean", "latent"):
        w_bt = 1.0 / n_bt
    elif method in ("last", "last_8"):
        n_last = 1 if method == "last" else 8
        w_bt = (positions_bt >= lengths_bt - n_last) / jnp.minimum(n_bt, n_last)
    else:
        raise ValueError(f"pooling {method!r}: expected one of {', '.join(POOLING_METHODS)}")
    return jnp.where(real_bt, w_bt, 0.0).astype(jnp.float32)


def text_positions(segments_bt: jax.Array) -> jax.Array:
    """Each real token's position in its row's one text [B, T] (segment 0 = padding, on either side)."""
    real_bt = segments_bt != 0
    return jnp.where(real_bt, jnp.cumsum(real_bt, axis=1) - 1, 0).astype(jnp.int32)


def pool(h_btd: jax.Array, segments_bt: jax.Array, method: str, pool_from_b: jax.Array | None = None) -> jax.Array:
    """Hidden states [B, T, D] of padded rows (one text each, padded on the right or the left; segment 0 =
    padding) -> vectors [B, D] in float32. pool_from_b [B]: each text's tokens before this position are not
    pooled (`pool_weights`' starts; None: all are)."""
    real_bt = segments_bt != 0
    lengths_b1 = real_bt.astype(jnp.int32).sum(1, keepdims=True)
    positions_bt = jnp.where(real_bt, text_positions(segments_bt), lengths_b1)  # padding: past the end, weight 0
    starts_b1 = None if pool_from_b is None else pool_from_b.astype(jnp.int32).reshape(-1, 1)
    w_bt = pool_weights(positions_bt, lengths_b1, method, starts_b1)
    return (h_btd.astype(jnp.float32) * w_bt[..., None]).sum(1)


def l2_normalize(x_nd: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows divided by max(norm, eps) (torch's `F.normalize`)."""
    return x_nd / jnp.maximum(jnp.linalg.norm(x_nd, axis=-1, keepdims=True), eps)


def finish(v_bd: jax.Array, *, normalize: bool, dim: int | None) -> jax.Array:
    """Matryoshka truncation to `dim`, then L2 normalisation."""
    if dim is not None:
        v_bd = v_bd[..., :dim]
    return l2_normalize(v_bd) if normalize else v_bd
