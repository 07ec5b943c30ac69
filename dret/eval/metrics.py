"""Ranking metrics with trec_eval's definitions (pytrec_eval is the test oracle), vectorised over queries.

A run is `ranked_ids` [Q, K] (doc ids, str or int) with optional `scores` [Q, K]; given scores, the run is
re-ordered like trec_eval (score descending, ties by doc id descending). qrels are `{qid: {doc_id: grade}}`:
grade > 0 is relevant and NDCG uses the grade as gain. Like pytrec_eval, only queries that appear in qrels
are averaged (one with no relevant doc scores 0). MRR@k is trec_eval's recip_rank on the run cut to k.
"""

from __future__ import annotations

import numpy as np

CUTOFFS = (1, 3, 5, 10, 100, 1000)


def trec_order(ranked_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Re-order each row of a run [Q, K] like trec_eval: score descending, then doc id descending."""
    _, id_rank_qk = np.unique(np.asarray(ranked_ids), return_inverse=True)
    id_rank_qk = id_rank_qk.reshape(np.shape(ranked_ids))
    order_qk = np.lexsort((-id_rank_qk, -np.asarray(scores, np.float64)), axis=-1)
    return np.take_along_axis(np.asarray(ranked_ids), order_qk, axis=-1)


def _gains(ranked_ids: np.ndarray, qids: list, qrels: dict) -> np.ndarray:
    """Grade of each ranked doc [Q, K]: 0 where unjudged or negative."""
    return np.array([[max(qrels[qid].get(d, 0), 0) for d in row] for qid, row in zip(qids, ranked_ids.tolist())],
                    np.float64).reshape(ranked_ids.shape)


def per_query(ranked_ids: np.ndarray, qids: list, qrels: dict, cutoffs=CUTOFFS,
              scores: np.ndarray | None = None) -> tuple[list, dict[str, np.ndarray]]:
    """(evaluated qids, {metric: values [Q']}) for the queries of `qids` that appear in qrels."""
    ranked_ids = np.asarray(ranked_ids)
    if scores is not None:
        ranked_ids = trec_order(ranked_ids, scores)
    rows = [i for i, qid in enumerate(qids) if qid in qrels]
    qids = [qids[i] for i in rows]
    ranked_ids = ranked_ids[rows]
    q, k = ranked_ids.shape
    gains_qk = _gains(ranked_ids, qids, qrels)
    rel_qk = gains_qk > 0
    top_c = max(max(cutoffs), k)
    ideal_qc = np.zeros((q, top_c), np.float64)
    for i, qid in enumerate(qids):
        best = sorted((g for g in qrels[qid].values() if g > 0), reverse=True)[:top_c]
        ideal_qc[i, :len(best)] = best
    n_rel_q = np.array([sum(g > 0 for g in qrels[qid].values()) for qid in qids], np.int64)
    safe_n_rel_q = np.maximum(n_rel_q, 1)
    discount_c = 1.0 / np.log2(np.arange(2, top_c + 2))
    hits_qk = np.cumsum(rel_qk, axis=1)
    rank_k = np.arange(1, k + 1)
    first_hit_q = np.where(rel_qk.any(1), rel_qk.argmax(1) + 1, np.inf)
    precision_at_hits_qk = rel_qk * hits_qk / rank_k
    out = {}
    for c in cutoffs:
        kc = min(c, k)
        dcg_q = (gains_qk[:, :kc] * discount_c[:kc]).sum(1)
        idcg_q = (ideal_qc[:, :c] * discount_c[:c]).sum(1)
        hits_q = hits_qk[:, kc - 1] if kc else np.zeros(q)
        out[f"ndcg_at_{c}"] = np.where(idcg_q > 0, dcg_q / np.where(idcg_q > 0, idcg_q, 1.0), 0.0)
        out[f"mrr_at_{c}"] = np.where(first_hit_q <= kc, 1.0 / first_hit_q, 0.0)
        out[f"recall_at_{c}"] = np.where(n_rel_q > 0, hits_q / safe_n_rel_q, 0.0)
        out[f"map_at_{c}"] = np.where(n_rel_q > 0, precision_at_hits_qk[:, :kc].sum(1) / safe_n_rel_q, 0.0)
        out[f"precision_at_{c}"] = hits_q / c
    return qids, out


def evaluate(ranked_ids: np.ndarray, qids: list, qrels: dict, cutoffs=CUTOFFS,
             scores: np.ndarray | None = None) -> dict[str, float]:
    """Mean over the queries in qrels of ndcg/mrr/recall/map/precision at each cutoff (fractions in [0, 1])."""
    _, values = per_query(ranked_ids, qids, qrels, cutoffs, scores)
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in values.items()}
