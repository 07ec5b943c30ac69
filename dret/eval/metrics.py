"""Ranking metrics with trec_eval's definitions (pytrec_eval is the test oracle), vectorised over queries.

A run is `ranked_ids` [Q, K] (object or int ids, best first, already ordered like trec_eval: score
descending, ties by doc id descending) and qrels `{qid: {doc_id: grade}}`; grade > 0 is relevant, and NDCG
uses the grade as gain.
"""

from __future__ import annotations

import numpy as np

CUTOFFS = (1, 3, 5, 10, 100, 1000)


def _grades(ranked_ids: np.ndarray, qids: list, qrels: dict) -> tuple[np.ndarray, np.ndarray]:
    """Grades of the ranked docs [Q, K] and each query's ideal grades sorted descending [Q, K]."""
    q, k = ranked_ids.shape
    gains_qk = np.zeros((q, k), np.float64)
    ideal_qk = np.zeros((q, k), np.float64)
    for i, qid in enumerate(qids):
        judged = qrels.get(qid, {})
        gains_qk[i] = [max(judged.get(d, 0), 0) for d in ranked_ids[i]]
        best = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
        ideal_qk[i, :len(best)] = best
    return gains_qk, ideal_qk


def evaluate(ranked_ids: np.ndarray, qids: list, qrels: dict, cutoffs=CUTOFFS) -> dict[str, float]:
    """Mean over the judged queries of ndcg/mrr/recall/map/precision at each cutoff (fractions in [0, 1])."""
    judged = [i for i, qid in enumerate(qids) if any(g > 0 for g in qrels.get(qid, {}).values())]
    ranked_ids = ranked_ids[judged]
    gains_qk, ideal_qk = _grades(ranked_ids, [qids[i] for i in judged], qrels)
    rel_qk = gains_qk > 0
    n_rel_q = np.array([sum(g > 0 for g in qrels[qids[i]].values()) for i in judged], np.float64)
    discount_k = 1.0 / np.log2(np.arange(2, ranked_ids.shape[1] + 2))
    hits_qk = np.cumsum(rel_qk, axis=1)
    rank_k = np.arange(1, ranked_ids.shape[1] + 1)
    first_hit_q = np.where(rel_qk.any(1), rel_qk.argmax(1) + 1, np.inf)
    out = {}
    for c in cutoffs:
        kc = min(c, ranked_ids.shape[1])
        dcg = (gains_qk[:, :kc] * discount_k[:kc]).sum(1)
        idcg = (ideal_qk[:, :kc] * discount_k[:kc]).sum(1)
        out[f"ndcg_at_{c}"] = np.mean(np.where(idcg > 0, dcg / np.maximum(idcg, 1e-300), 0.0))
        out[f"mrr_at_{c}"] = np.mean(np.where(first_hit_q <= kc, 1.0 / first_hit_q, 0.0))
        out[f"recall_at_{c}"] = np.mean(hits_qk[:, kc - 1] / n_rel_q)
        out[f"map_at_{c}"] = np.mean((rel_qk[:, :kc] * hits_qk[:, :kc] / rank_k[:kc]).sum(1) / n_rel_q)
        out[f"precision_at_{c}"] = np.mean(hits_qk[:, kc - 1] / c)
    return {k: float(v) for k, v in out.items()}
