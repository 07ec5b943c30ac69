"""Bad evaluation input ends in one-line DretErrors (file:line and what was expected); a corrupt embedding cache
is a warned miss that gets rewritten; --mteb without network or with a mistyped task says what to do; every data
set gets its own result file."""

import json
import logging
import os

import numpy as np
import pytest

from dret.errors import DretError
from dret.eval import cache, datasets, run
from dret.eval.__main__ import main as eval_main
from tests.test_eval_datasets import CORPUS, QUERIES, write_beir


def beir(tmp_path, name="toy"):
    return write_beir(tmp_path / name, CORPUS, QUERIES, [("q1", "d1", 1), ("q2", "d2", 2)])


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_non_utf8_corpus_names_file_and_line(tmp_path):
    folder = beir(tmp_path)
    with open(folder / "corpus.jsonl", "ab") as f:
        f.write('{"_id": "d9", "text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DretError) as error:
        datasets.load_beir(str(folder))
    assert one_line(error).startswith(f"{folder / 'corpus.jsonl'}:4: expected UTF-8 text, got byte 0xe9")


def test_non_utf8_tsv_names_file_and_line(tmp_path):
    (tmp_path / "collection.tsv").write_bytes("pid\tpara\n0\tcafé\n".encode("latin-1"))
    (tmp_path / "queries.dev.tsv").write_text("10\tq\n")
    (tmp_path / "qrels.retrieval.dev.tsv").write_text("10\t0\n")
    with pytest.raises(DretError, match=r"collection.tsv:2: expected UTF-8 text, got byte 0xe9"):
        datasets.load_t2ranking(str(tmp_path))


@pytest.mark.parametrize("file, row, expected", [
    ("corpus.jsonl", {"_id": "d9", "text": 5}, "expected \"text\" to be a string or null, got int 5"),
    ("corpus.jsonl", {"_id": "d9", "title": ["a"], "text": "x"},
     "expected \"title\" to be a string or null, got list ['a']"),
    ("queries.jsonl", {"_id": "q9", "text": {"a": 1}}, "expected \"text\" to be a string or null, got dict {'a': 1}"),
    ("corpus.jsonl", {"_id": None, "text": "x"}, "expected \"_id\" to be a string or an integer, got null"),
    ("corpus.jsonl", {"_id": 1.5, "text": "x"}, "expected \"_id\" to be a string or an integer, got float 1.5"),
    ("corpus.jsonl", {"text": "x"}, "expected an \"_id\" key, got keys list ['text']"),
])
def test_wrong_json_types(tmp_path, file, row, expected):
    folder = beir(tmp_path)
    with open(folder / file, "a") as f:
        f.write(json.dumps(row) + "\n")
    with pytest.raises(DretError) as error:
        datasets.load_beir(str(folder))
    assert one_line(error) == f"{folder / file}:4: {expected}"


@pytest.mark.parametrize("line, expected", [
    ("{not json", "expected a JSON object, got invalid JSON"),
    ('{"_id": "d9", "te', "expected a JSON object, got invalid JSON"),
    ("null", "expected a JSON object, got null"),
    ("[1, 2]", "expected a JSON object, got list [1, 2]"),
    ('"d9"', "expected a JSON object, got str 'd9'"),
    ("[" * 100_000, "expected a JSON object, got invalid JSON"),
    ('{"_id": "d9", "text": "\\ud800"}', "expected \"text\" to be valid Unicode, got a lone surrogate"),
])
def test_broken_json_lines(tmp_path, line, expected):
    folder = beir(tmp_path)
    with open(folder / "corpus.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(DretError) as error:
        datasets.load_beir(str(folder))
    assert one_line(error).startswith(f"{folder / 'corpus.jsonl'}:4: {expected}")


@pytest.mark.parametrize("line, expected", [
    ("q1\td1\tinf", "expected an integer grade, got 'inf'"),
    ("q1\td1\tnan", "expected an integer grade, got 'nan'"),
    ("q1\td1\t1.5", "expected an integer grade, got '1.5'"),
    ("q1\td1\thigh", "expected an integer grade, got 'high'"),
    ("q1\td1\t", "expected an integer grade, got ''"),
    ("q1", "expected 2 tab-separated fields, got 1"),
])
def test_bad_qrels_lines(tmp_path, line, expected):
    folder = beir(tmp_path)
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write(line + "\n")
    with pytest.raises(DretError) as error:
        datasets.load_beir(str(folder))
    assert one_line(error) == f"{folder / 'qrels' / 'test.tsv'}:4: {expected}"


class CountingEmbedder:
    """Deterministic vectors from text lengths; counts the texts it encodes."""

    def __init__(self):
        self.encoded = 0

    def encode(self, texts, **_):
        self.encoded += len(texts)
        return np.stack([np.array([len(t), 1.0, i % 3], np.float32) for i, t in enumerate(texts)])


def evaluate_cached(data, cache_dir, embedder):
    opts = run.EvalOptions(cache_dir=str(cache_dir), progress=False, top_k=10)
    return run.evaluate_retrieval(lambda: embedder, data, opts, model_key="model")


def entries(cache_dir):
    return sorted(os.path.join(cache_dir, k) for k in os.listdir(cache_dir))


def test_cache_hit_then_corrupt_entries_are_misses_and_rewritten(tmp_path, caplog):
    data = datasets.load_beir(str(beir(tmp_path)))
    cache_dir = tmp_path / "cache"
    first = evaluate_cached(data, cache_dir, CountingEmbedder())
    assert first["cache_hits"] == 0 and len(entries(cache_dir)) == 2
    assert sorted(os.listdir(entries(cache_dir)[0])) == ["emb.npy", "manifest.json"]  # no temporary file left
    embedder = CountingEmbedder()
    assert evaluate_cached(data, cache_dir, embedder)["cache_hits"] == 2 and embedder.encoded == 0

    truncated, wrong, bad_manifest = entries(cache_dir)[0], entries(cache_dir)[1], entries(cache_dir)[0]
    emb = os.path.join(truncated, "emb.npy")
    with open(emb, "r+b") as f:
        f.truncate(os.path.getsize(emb) - 5)
    stored = np.load(os.path.join(wrong, "emb.npy"))
    np.save(os.path.join(wrong, "emb.npy"), stored[::-1])  # well-formed, same shape and dtype, wrong values
    with caplog.at_level(logging.WARNING, logger="dret.eval.cache"):
        embedder = CountingEmbedder()
        again = evaluate_cached(data, cache_dir, embedder)
    assert again["cache_hits"] == 0 and embedder.encoded == len(data.query_texts) + len(data.corpus_texts)
    assert again["ndcg_at_10"] == first["ndcg_at_10"]
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert os.path.join(truncated, "emb.npy") in warned and os.path.join(wrong, "emb.npy") in warned
    assert "checksum" in warned
    assert evaluate_cached(data, cache_dir, CountingEmbedder())["cache_hits"] == 2  # rewritten

    (tmp_path / "cache" / os.path.basename(bad_manifest) / "manifest.json").write_text("{broken")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dret.eval.cache"):
        assert evaluate_cached(data, cache_dir, CountingEmbedder())["cache_hits"] == 1
    assert os.path.join(bad_manifest, "manifest.json") in caplog.text


def test_cache_checks_shape_and_dtype(tmp_path, caplog):
    emb_nd = np.arange(6, dtype=np.float32).reshape(3, 2)
    cache.save(str(tmp_path), "k", emb_nd, {})
    assert np.array_equal(cache.load(str(tmp_path), "k", rows=3), emb_nd)
    with caplog.at_level(logging.WARNING, logger="dret.eval.cache"):
        assert cache.load(str(tmp_path), "k", rows=4) is None
    assert "expected 4 rows" in caplog.text
    np.save(tmp_path / "k" / "emb.npy", emb_nd.astype(np.float64))
    with caplog.at_level(logging.WARNING, logger="dret.eval.cache"):
        assert cache.load(str(tmp_path), "k", rows=3) is None
    assert "float64" in caplog.text


def test_cache_write_is_atomic(tmp_path, monkeypatch, caplog):
    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with caplog.at_level(logging.WARNING, logger="dret.eval.cache"):
        cache.save(str(tmp_path), "k", np.ones((2, 2), np.float32), {})
    assert "No space left on device" in caplog.text and str(tmp_path / "k") in caplog.text
    assert os.listdir(tmp_path / "k") == []  # neither a half entry nor a temporary file
    monkeypatch.undo()
    assert cache.load(str(tmp_path), "k", rows=2) is None


def test_unknown_mteb_task_lists_close_names():
    from dret.eval.mteb_model import run_mteb_tasks

    def no_model():
        raise AssertionError("the model must not be loaded for an unknown task")

    with pytest.raises(DretError) as error:
        run_mteb_tasks(no_model, ["SciFcat"], run.EvalOptions())
    assert one_line(error).startswith("--mteb: unknown task 'SciFcat'") and "SciFact" in str(error.value)
    with pytest.raises(DretError, match="--mteb: expected comma-separated task names, got ' , '"):
        run_mteb_tasks(no_model, " , ".split(","), run.EvalOptions())


def test_mteb_offline_says_to_use_a_local_folder(tmp_path, minilm_dir):
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    assert HF_HUB_OFFLINE  # conftest
    if os.path.isdir(os.path.join(HF_HUB_CACHE, "datasets--mteb--scifact")):
        pytest.skip(f"SciFact is in the HF cache {HF_HUB_CACHE}: it would be evaluated, not missing")
    with pytest.raises(DretError) as error:
        eval_main(["--model", minilm_dir, "--mteb", "SciFact", "--output_folder", str(tmp_path / "out")])
    message = one_line(error)
    assert "SciFact" in message and "could not be downloaded" in message and "HF_HUB_OFFLINE" in message
    assert "--data" in message


def test_each_data_set_gets_its_own_result_file(tmp_path, minilm_dir, monkeypatch):
    a, b = beir(tmp_path / "a"), beir(tmp_path / "b")
    here = beir(tmp_path / "c", "mine")
    monkeypatch.chdir(here)
    out = tmp_path / "out"
    results = eval_main(["--model", minilm_dir, "--data", str(a), "--data", str(b), "--data", ".",
                         "--output_folder", str(out), "--no_cache", "--max_seq_length", "16"])
    assert sorted(os.listdir(out)) == ["mine.json", "toy.json", "toy_2.json"]
    assert [r["dataset"] for r in results] == ["toy", "toy_2", "mine"]
    assert json.loads((out / "toy.json").read_text())["data"] == str(a)
    assert json.loads((out / "toy_2.json").read_text())["data"] == str(b)
    assert json.loads((out / "mine.json").read_text())["data"] == str(here)
