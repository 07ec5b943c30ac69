"""Contrastive InfoNCE and Matryoshka losses: pure functions on embeddings, scores in float32.

Semantics follow PaddleNLP's contrastive-training example, `BiEncoderModel` in
`slm/pipelines/examples/contrastive_training/models/modeling.py` (`hard_negative_loss`,
`in_batch_negative_loss`, `forward`), and its data (`data.py`, `TrainDatasetForEmbedding`):

- default (`use_inbatch_neg=False`, the reference's `hard_negative_loss`): every query is scored
  against ALL passages of the batch, its own group and every other query's group alike:
  scores [B, B*G] = q @ p.T / temperature, cross-entropy with target i*G. No margin.
- `use_inbatch_neg=True` (`in_batch_negative_loss`): one passage per query (the reference's data
  then samples no negatives): scores [B, B] = q @ pos.T, `margin` subtracted from the diagonal
  (each query's own positive), THEN divided by temperature; cross-entropy with target i.
  Here the positives are p_nd[::group_size], so any negatives present are ignored.

B is the global batch: under jit on globally sharded arrays XLA gathers the passages, and the loss is
the mean over all B queries (no 1/world_size factor).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dret.pooling import l2_normalize


def contrastive_loss(
    q_bd: jax.Array,
    p_nd: jax.Array,
    *,
    group_size: int,
    temperature: float,
    margin: float,
    use_inbatch_neg: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Queries [B, d] and passages [B*G, d] (query i's group at rows i*G..i*G+G-1, positive first).

    Returns (mean cross-entropy over the B queries, {'accuracy': in-batch top-1 accuracy}).
    """
    n_queries = q_bd.shape[0]
    if p_nd.shape[0] != n_queries * group_size:
        raise ValueError(f"passages {p_nd.shape[0]} != queries {n_queries} x group_size {group_size}")
    q_bd = q_bd.astype(jnp.float32)
    p_nd = p_nd.astype(jnp.float32)
    if use_inbatch_neg:
        pos_bd = p_nd[::group_size]
        scores_bn = q_bd @ pos_bd.T - margin * jnp.eye(n_queries, dtype=jnp.float32)
        target_b = jnp.arange(n_queries)
    else:
        scores_bn = q_bd @ p_nd.T
        target_b = jnp.arange(n_queries) * group_size
    logits_bn = scores_bn / temperature
    logp_bn = jax.nn.log_softmax(logits_bn, axis=-1)
    loss = -jnp.take_along_axis(logp_bn, target_b[:, None], axis=-1).mean()
    accuracy = (jnp.argmax(logits_bn, axis=-1) == target_b).mean(dtype=jnp.float32)
    return loss, {"accuracy": accuracy}


def matryoshka_loss(
    q_bd: jax.Array,
    p_nd: jax.Array,
    *,
    dims: Sequence[int],
    weights: Sequence[float],
    **contrastive_kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over dims of weight * contrastive_loss on the first `dim` features, re-normalised.

    Metrics: 'loss_dim_{dim}' per dim, and 'accuracy' of the largest dim.
    """
    if len(dims) != len(weights):
        raise ValueError(f"{len(dims)} matryoshka dims but {len(weights)} weights")
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for dim, weight in sorted(zip(dims, weights)):
        loss_dim, dim_metrics = contrastive_loss(
            l2_normalize(q_bd[:, :dim].astype(jnp.float32)),
            l2_normalize(p_nd[:, :dim].astype(jnp.float32)),
            **contrastive_kwargs,
        )
        total = total + weight * loss_dim
        metrics[f"loss_dim_{dim}"] = loss_dim
        metrics["accuracy"] = dim_metrics["accuracy"]
    return total, metrics
