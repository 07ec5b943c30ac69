"""Evaluators for the training loop, built from the run's config: the trainer receives them and imports nothing
from dret.eval."""

from __future__ import annotations

from typing import Callable

from dret.eval.run import evaluate_beir

LOGGED = ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100")  # logged as eval_<metric>


def from_config(config) -> tuple[Callable, ...]:
    """() without config.eval_data; else one evaluator: Embedder -> {eval_<metric>: value} on that BEIR folder's
    config.eval_split, encoded as training encodes (instructions and max lengths)."""
    if not config.eval_data:
        return ()

    def beir(embedder) -> dict[str, float]:
        results = evaluate_beir(embedder, config.eval_data, config.eval_split, top_k=100,
                                query_instruction=config.query_instruction_for_retrieval,
                                document_instruction=config.passage_instruction_for_retrieval,
                                query_max_length=config.query_max_len, passage_max_length=config.passage_max_len)
        return {f"eval_{k}": results[k] for k in LOGGED}

    return (beir,)
