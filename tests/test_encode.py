"""Embedder.encode: pooling, bucketing, order, instructions, Matryoshka truncation."""

import numpy as np
import pytest

from dret.errors import DretError
from dret.model import Embedder, length_buckets, pool


def numpy_pool(h, mask, method, side):
    out = []
    for hb, mb in zip(h, mask):
        real = np.flatnonzero(mb)
        if method == "cls":
            out.append(hb[0])
        elif method == "mean":
            out.append(hb[real].mean(0))
        else:
            n = 1 if method == "last" else 8
            rows = hb[-n:] if side == "left" else hb[real[-n:]]
            out.append(rows.mean(0))
    return np.stack(out)


@pytest.mark.parametrize("method,side", [(m, "right") for m in ("cls", "mean", "last", "last_8")]
                         + [(m, "left") for m in ("mean", "last", "last_8")])  # cls needs [CLS] first
def test_pooling_matches_numpy(method, side):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 12, 5)).astype(np.float32)
    lengths = [12, 9, 3, 1]
    mask = np.array([[1] * n + [0] * (12 - n) for n in lengths])
    if side == "left":
        mask = mask[:, ::-1].copy()
    np.testing.assert_allclose(pool(h, mask, method, side), numpy_pool(h, mask, method, side), rtol=1e-6)


def test_length_buckets():
    assert length_buckets(256) == list(range(16, 257, 16))
    assert length_buckets(100) == [16, 32, 48, 64, 80, 96, 100]
    assert length_buckets(512) == list(range(16, 257, 16)) + list(range(288, 513, 32))
    assert length_buckets(16) == [16]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.from_pretrained(minilm_dir)


def test_order_and_buckets_do_not_change_vectors(minilm):
    texts = ["short", "a much longer text " * 20, "medium length text here", "x " * 300, ""]
    together = minilm.encode(texts, batch_size=2)
    alone = np.concatenate([minilm.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert together.dtype == np.float32 and together.shape == (5, 384)


def test_instruction_is_a_prefix(minilm):
    a = minilm.encode(["query: what is a cell?"])
    b = minilm.encode(["what is a cell?"], instruction="query: ")
    np.testing.assert_array_equal(a, b)


def test_matryoshka_dim(minilm):
    full = minilm.encode(["protein folding"])
    cut = minilm.encode(["protein folding"], dim=64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, rtol=1e-5)
    with pytest.raises(DretError, match="dim=999"):
        minilm.encode(["x"], dim=999)


def test_max_length_truncates(minilm):
    long_text = "retrieval " * 300
    assert not np.allclose(minilm.encode([long_text], max_length=16), minilm.encode([long_text], max_length=256))
    assert minilm.max_length == 256  # from sentence_bert_config.json


def _plan_cost(natural, rows, padded, compile_tokens):
    return sum(r * p for r, p in zip(rows, padded)) + compile_tokens * len(set(padded))


def test_plan_lengths_is_the_cheapest_cover():
    """The plan equals a brute-force search over every set of compiled lengths (the longest always compiled)."""
    import itertools

    from dret.eval.encode import plan_lengths

    rng = np.random.default_rng(0)
    for _ in range(40):
        natural = sorted(rng.choice(np.arange(16, 257, 16), size=int(rng.integers(1, 12))).tolist(), reverse=True)
        rows = rng.integers(1, 65, size=len(natural)).tolist()
        compile_tokens = float(rng.choice([0, 500, 3000, 20000]))
        padded = plan_lengths(natural, rows, compile_tokens)
        assert padded[0] == natural[0] and all(p >= n for p, n in zip(padded, natural))
        assert padded == sorted(padded, reverse=True)
        lengths = sorted(set(natural), reverse=True)
        brute = min(_plan_cost(natural, rows, [min(c for c in (lengths[0], *extra) if c >= n) for n in natural],
                               compile_tokens)
                    for k in range(len(lengths)) for extra in itertools.combinations(lengths[1:], k))
        assert _plan_cost(natural, rows, padded, compile_tokens) == pytest.approx(brute)
    assert plan_lengths([64, 32, 32, 16], [64] * 4, 0) == [64, 32, 32, 16]
    assert plan_lengths([64, 32, 32, 16], [64] * 4, 1e9) == [64] * 4
