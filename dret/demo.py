"""`make demo`: encode the built-in corpus with the bundled all-MiniLM-L6-v2 and answer its queries."""

from __future__ import annotations

import sys
import time

import numpy as np

from dret.demo_data import build_pairs
from dret.errors import DretError
from dret.eval.metrics import evaluate
from dret.eval.search import search
from dret.model import Embedder
from dret.resources import bundled_minilm

EXAMPLES = 3


def main() -> None:
    pairs = build_pairs()
    queries, passages = [p["query"] for p in pairs], [p["passage"] for p in pairs]
    model = Embedder.from_pretrained(bundled_minilm())
    print(f"Built-in data: {len(pairs)} query/passage pairs from the Python {sys.version.split()[0]} "
          f"standard library's docstrings; model all-MiniLM-L6-v2 ({model.pooling} pooling, max {model.max_length} tokens)")
    start = time.perf_counter()
    p_nd = model.encode(passages)
    seconds = time.perf_counter() - start
    q_qd = model.encode(queries)
    _, top_qk = search(q_qd, p_nd, top_k=10)
    ids = np.array([p["id"] for p in pairs], dtype=object)
    metrics = evaluate(ids[top_qk], list(ids), {p["id"]: {p["id"]: 1} for p in pairs}, cutoffs=(1, 10))
    print(f"Encoded {len(passages)} passages in {seconds:.1f} s ({len(passages) / seconds:.0f} passages/s)")
    print(f"Each query's own passage ranked first: {metrics['recall_at_1']:.3f}  MRR@10: {metrics['mrr_at_10']:.3f}")
    for i in np.linspace(0, len(pairs) - 1, EXAMPLES).astype(int):
        print(f"\nQ: {queries[i]}")
        for rank, j in enumerate(top_qk[i, :3], 1):
            mark = "*" if j == i else " "
            print(f"  {rank}{mark} {ids[j]}: {passages[j][:90]}...")


if __name__ == "__main__":
    try:
        main()
    except DretError as e:
        sys.exit(f"dret: {e}")
