"""Embedder.encode: pooling, packing, order, instructions, Matryoshka truncation."""

import numpy as np
import pytest

from dret.errors import DretError
from dret import encode as encode_lib
from dret.model import Embedder
from dret.pooling import pool


def numpy_pool(h, mask, method):
    out = []
    for hb, mb in zip(h, mask):
        real = np.flatnonzero(mb)
        if method == "cls":
            out.append(hb[0])
        elif method == "mean":
            out.append(hb[real].mean(0))
        else:
            out.append(hb[real[-(1 if method == "last" else 8):]].mean(0))
    return np.stack(out)


@pytest.mark.parametrize("method", ["cls", "mean", "last", "last_8"])
def test_pooling_matches_numpy(method):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 12, 5)).astype(np.float32)
    mask = np.array([[1] * n + [0] * (12 - n) for n in [12, 9, 3, 1]])
    np.testing.assert_allclose(pool(h, mask, method), numpy_pool(h, mask, method), rtol=1e-6)


def test_packing_fills_rows_and_keeps_every_text_once():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([np.full(300, 256), rng.integers(2, 256, 700)])
    rows = encode_lib.pack(lengths, 1024, 128)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
    assert all(lengths[r].sum() <= 1024 and len(r) <= 128 for r in rows)
    assert lengths.sum() / (len(rows) * 1024) > 0.97  # the rows are nearly full
    assert [len(r) for r in encode_lib.pack(np.full(10, 3), 16, 2)] == [2] * 5  # at most 2 texts a row


def test_row_length():
    assert encode_lib.row_length(np.array([256] * 100), 1024, 1) == 1024
    assert encode_lib.row_length(np.array([5, 9]), 1024, 1) == 16  # a small input compiles small
    assert encode_lib.row_length(np.array([5] * 100), 1024, 8) == 64  # spread over 8 devices
    assert encode_lib.row_length(np.array([700]), 512, 1) == 1024  # the longest text always fits


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.from_pretrained(minilm_dir)


def test_order_and_packing_do_not_change_vectors(minilm):
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


def test_a_block_of_empty_rows_passes_through_the_layers(minilm):
    """Packed batches are filled up with empty rows (segment 0); on CPU the layers skip a block of them."""
    import jax.numpy as jnp

    model = minilm.backbone
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 5000, (8, 256)), jnp.int32)
    segments = jnp.asarray(np.repeat([1, 1, 1, 1, 0, 0, 0, 0], 256).reshape(8, 256), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(256), (8, 256))
    h = np.asarray(model(ids, segments, positions_bt=positions))  # 1024-token blocks: rows 0-3, then rows 4-7
    np.testing.assert_allclose(h[:4], model(ids[:4], segments[:4], positions_bt=positions[:4]), atol=1e-5)
    embedded = model.embeddings(ids[4:], positions[4:], jnp.zeros_like(ids[4:]))
    np.testing.assert_array_equal(h[4:], embedded)
