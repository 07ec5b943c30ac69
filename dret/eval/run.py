"""One evaluation: encode queries and the corpus (in shards, cached), search, merge top-k, score.

`evaluate_retrieval` is the whole pipeline; `evaluate_beir` is the entry the trainer calls with a live model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable

import numpy as np

from dret.errors import DretError
from dret.eval import cache, metrics, search
from dret.eval.datasets import Retrieval, load_beir


@dataclasses.dataclass
class EvalOptions:
    """Encoding and search settings (the reference's names where it has them)."""
    query_instruction: str = ""
    document_instruction: str = ""
    examples: tuple[str, ...] = ()  # in-context examples of every query (bge_icl; `dret.prompts.format_example`)
    query_max_length: int | None = None  # None: the model's max length
    passage_max_length: int | None = None
    eval_batch_size: int = 64
    dim: int | None = None  # Matryoshka truncation
    top_k: int = 1000
    index: str = "flat"  # flat | ivf | hnsw
    nlist: int = 0  # IVF lists; 0 = about 4 sqrt(N)
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 256
    shard_size: int = 1_000_000  # passages encoded and searched at a time
    cache_dir: str | None = None  # None: no embedding cache
    progress: bool = True


class _Encoder:
    """Encodes texts with a lazily loaded model, through the cache when the model has a key."""

    def __init__(self, get_embedder: Callable, model_key: str | None, opts: EvalOptions):
        self.get_embedder, self.model_key, self.opts = get_embedder, model_key, opts
        self._embedder = None
        self.seconds = 0.0
        self.cache_hits = 0

    def __call__(self, texts: list[str], *, role: str, data_key: str, instruction: str,
                 max_length: int | None) -> np.ndarray:
        cache_dir = self.opts.cache_dir if self.model_key else None
        examples = self.opts.examples if role == "query" else ()
        k = cache.key(model=self.model_key, data=data_key, role=role, instruction=instruction,
                      max_length=max_length, dim=self.opts.dim, **({"examples": list(examples)} if examples else {}))
        emb_nd = cache.load(cache_dir, k, rows=len(texts))
        if emb_nd is not None:
            self.cache_hits += 1
            return emb_nd
        if self._embedder is None:
            self._embedder = self.get_embedder()
        start = time.perf_counter()
        emb_nd = self._embedder.encode(texts, batch_size=self.opts.eval_batch_size, max_length=max_length,
                                       instruction=instruction, dim=self.opts.dim, progress=self.opts.progress,
                                       role=role, examples=examples)
        self.seconds += time.perf_counter() - start
        cache.save(cache_dir, k, emb_nd, {"model": self.model_key, "data": data_key, "role": role,
                                          "instruction": instruction, "max_length": max_length, "dim": self.opts.dim})
        return emb_nd


def _texts_key(texts: list[str]) -> str:
    return cache.key(texts=hashlib.sha256("\n".join(texts).encode()).hexdigest())


def evaluate_retrieval(get_embedder: Callable, data: Retrieval, opts: EvalOptions, model_key: str | None = None,
                       *, get_passage_embedder: Callable | None = None, passage_key: str | None = None) -> dict:
    """Metrics (fractions) and run metadata for one data set; cache used only for a side with a key.

    A dual encoder: queries are encoded by `get_embedder()` (cache key `model_key`), the corpus by
    `get_passage_embedder()` (cache key `passage_key`); without one, by the query model (the symmetric case)."""
    start = time.perf_counter()
    queries = _Encoder(get_embedder, model_key, opts)
    corpus = queries if get_passage_embedder is None else _Encoder(get_passage_embedder, passage_key, opts)
    sides = (queries,) if corpus is queries else (queries, corpus)
    q_qd = queries(data.query_texts, role="query", data_key=_texts_key(data.query_texts),
                   instruction=opts.query_instruction, max_length=opts.query_max_length)
    corpus_key = cache.key(files=[cache.file_fingerprint(data.files[0])] if data.files else None,
                           texts=None if data.files else _texts_key(data.corpus_texts))
    n = len(data.corpus_texts)
    approx = opts.index != "flat"
    top = exact = None
    search_seconds = 0.0
    for lo in range(0, n, opts.shard_size):
        hi = min(n, lo + opts.shard_size)
        p_nd = corpus(data.corpus_texts[lo:hi], role="passage", data_key=f"{corpus_key}:{lo}:{hi}",
                      instruction=opts.document_instruction, max_length=opts.passage_max_length)
        if p_nd.shape[1] != q_qd.shape[1]:
            raise DretError(f"the query model gives {q_qd.shape[1]}-dim vectors and the passage model "
                            f"{p_nd.shape[1]}: a dual encoder needs one size")
        t = time.perf_counter()
        scores_qk, rows_qk = search.search(q_qd, p_nd, opts.top_k, opts.index, nlist=opts.nlist, nprobe=opts.nprobe,
                                           hnsw_m=opts.hnsw_m, ef_search=opts.ef_search)
        shard = (scores_qk, np.where(rows_qk < 0, -1, rows_qk + lo))
        top = shard if top is None else search.merge_top_k(*top, *shard, opts.top_k)
        if approx:
            scores_qk, rows_qk = search.search(q_qd, p_nd, opts.top_k)
            exact = (scores_qk, rows_qk + lo) if exact is None else search.merge_top_k(*exact, scores_qk, rows_qk + lo,
                                                                                       opts.top_k)
        search_seconds += time.perf_counter() - t
    t = time.perf_counter()
    scores_qk, rows_qk = top
    ids = np.array(data.corpus_ids + [""], dtype=object)  # row -1 (unfilled by an approximate index) -> ""
    result = metrics.evaluate(ids[rows_qk], data.query_ids, data.qrels, scores=scores_qk)
    if approx:
        result["recall_vs_exact_at_10"] = search.recall_vs_exact(rows_qk, exact[1], 10)
        result["recall_vs_exact_at_100"] = search.recall_vs_exact(rows_qk, exact[1], 100)
        exact_metrics = metrics.evaluate(ids[exact[1]], data.query_ids, data.qrels, scores=exact[0])
        result["exact_ndcg_at_10"] = exact_metrics["ndcg_at_10"]
    result.update(dataset=data.name, data=data.folder, num_queries=len(data.query_ids), num_passages=n,
                  skipped_qrels=data.skipped_qrels, top_k=opts.top_k, index=opts.index,
                  encode_seconds=round(sum(e.seconds for e in sides), 3), search_seconds=round(search_seconds, 3),
                  metrics_seconds=round(time.perf_counter() - t, 3),
                  total_seconds=round(time.perf_counter() - start, 3), cache_hits=sum(e.cache_hits for e in sides))
    return result


def evaluate_beir(embedder, data_dir: str, split: str = "test", **options) -> dict:
    """Evaluate a live Embedder on a BEIR folder (no embedding cache): {ndcg_at_10: ..., ...}; options: EvalOptions."""
    opts = EvalOptions(**{"progress": False, **options})
    return evaluate_retrieval(lambda: embedder, load_beir(data_dir, split), opts)
