"""A dual encoder: queries encoded by one Embedder, passages by another (RocketQA's query and para encoders).
One Embedder for both sides is the common, symmetric case: `DualEncoder(embedder)`."""

from __future__ import annotations

import os

import numpy as np

from dret.errors import DretError
from dret.model import Embedder


class DualEncoder:
    """A (query, passage) pair of Embedders whose vectors share one space (the same size)."""

    def __init__(self, query: Embedder, passage: Embedder | None = None):
        passage = query if passage is None else passage
        if query.dim != passage.dim:
            raise DretError(f"the query encoder gives {query.dim}-dim vectors and the passage encoder {passage.dim}: "
                            "a dual encoder needs one size")
        self.query, self.passage = query, passage

    @classmethod
    def from_pretrained(cls, query_path: str, passage_path: str, **options) -> "DualEncoder":
        """Two HF / sentence-transformers folders (one folder given twice is loaded once); options:
        Embedder.from_pretrained's."""
        query = Embedder.from_pretrained(query_path, **options)
        same = os.path.realpath(query_path) == os.path.realpath(passage_path)
        return cls(query, query if same else Embedder.from_pretrained(passage_path, **options))

    def encode_queries(self, texts: list[str], **options) -> np.ndarray:
        """Queries -> float32 [N, d] with the query encoder; options: Embedder.encode's."""
        return self.query.encode(texts, role="query", **options)

    def encode_corpus(self, texts: list[str], **options) -> np.ndarray:
        """Passages -> float32 [N, d] with the passage encoder; options: Embedder.encode's."""
        return self.passage.encode(texts, role="passage", **options)
