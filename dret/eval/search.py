"""Exact inner-product search with faiss."""

from __future__ import annotations

import faiss
import numpy as np


def search(q_qd: np.ndarray, p_nd: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k passages per query by inner product: (scores [Q, K], passage rows [Q, K]), best first."""
    index = faiss.IndexFlatIP(p_nd.shape[1])
    index.add(np.ascontiguousarray(p_nd, np.float32))
    return index.search(np.ascontiguousarray(q_qd, np.float32), min(top_k, p_nd.shape[0]))
