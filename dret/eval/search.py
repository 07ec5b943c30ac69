"""Inner-product top-k with faiss: exact (flat) by default, IVF or HNSW for very large corpora; merging of
per-shard top-k lists, and the recall of an approximate search against the exact one."""

from __future__ import annotations

import faiss
import numpy as np

from dret.errors import DretError

INDEXES = ("flat", "ivf", "hnsw")


def build_index(p_nd: np.ndarray, kind: str = "flat", *, nlist: int = 0, nprobe: int = 32, hnsw_m: int = 32,
                ef_search: int = 256) -> faiss.Index:
    """A faiss inner-product index over p_nd; nlist 0 means about 4 * sqrt(N) IVF lists."""
    p_nd = np.ascontiguousarray(p_nd, np.float32)
    d = p_nd.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(int(4 * np.sqrt(len(p_nd))), len(p_nd) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(p_nd)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise DretError(f"index {kind!r}: expected one of {', '.join(INDEXES)}")
    index.add(p_nd)
    return index


def search(q_qd: np.ndarray, p_nd: np.ndarray, top_k: int, kind: str = "flat", **index_options
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k passages per query by inner product: (scores [Q, K], passage rows [Q, K]), best first.

    K = min(top_k, N); rows an approximate index could not fill are -1 with score -inf.
    """
    index = build_index(p_nd, kind, **index_options)
    scores_qk, rows_qk = index.search(np.ascontiguousarray(q_qd, np.float32), min(top_k, p_nd.shape[0]))
    return np.where(rows_qk < 0, -np.inf, scores_qk).astype(np.float32), rows_qk


def merge_top_k(scores_qk: np.ndarray, rows_qk: np.ndarray, scores_qj: np.ndarray, rows_qj: np.ndarray,
                top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two top lists of the same queries (rows already global) into one top_k, best first."""
    scores_qm = np.concatenate([scores_qk, scores_qj], axis=1)
    rows_qm = np.concatenate([rows_qk, rows_qj], axis=1)
    order_qm = np.argsort(-scores_qm, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(scores_qm, order_qm, 1), np.take_along_axis(rows_qm, order_qm, 1)


def recall_vs_exact(rows_qk: np.ndarray, exact_rows_qk: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k rows that the approximate top-k also found."""
    k = min(k, exact_rows_qk.shape[1])
    found = [len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows_qk.tolist(), exact_rows_qk.tolist())]
    return float(np.mean(found))
