"""Real embeddings (all-MiniLM-L6-v2) on CISI and Cranfield subsets: metrics == pytrec_eval, the pipeline's
shards / cache / approximate indexes, and the CLI end to end."""

import json

import numpy as np
import pytest

from dret.eval import datasets, run, search
from dret.eval.__main__ import main as eval_main
from dret.model import Embedder
from tests.test_eval_metrics import assert_matches_pytrec

N_QUERIES, N_EXTRA_DOCS, MAX_LENGTH = 25, 150, 64


def subset(data: datasets.Retrieval) -> datasets.Retrieval:
    """The first N_QUERIES queries, their judged passages and N_EXTRA_DOCS more: small enough to encode in seconds."""
    qids = data.query_ids[:N_QUERIES]
    keep = {d for q in qids for d in data.qrels[q]} | set(data.corpus_ids[:N_EXTRA_DOCS])
    rows = [i for i, d in enumerate(data.corpus_ids) if d in keep]
    return datasets.Retrieval(data.name, [data.corpus_ids[i] for i in rows], [data.corpus_texts[i] for i in rows],
                              qids, data.query_texts[:N_QUERIES], {q: data.qrels[q] for q in qids}, [])


@pytest.fixture(scope="session")
def minilm(minilm_dir):
    return Embedder.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def encoded(shared_data, minilm):
    """{name: (data subset, q_qd, p_nd)} for cisi and cranfield, encoded once per session."""
    out = {}
    for name in ("cisi", "cranfield"):
        data = subset(datasets.load_beir(str(shared_data / name)))
        q_qd = minilm.encode(data.query_texts, max_length=MAX_LENGTH, progress=False)
        p_nd = minilm.encode(data.corpus_texts, max_length=MAX_LENGTH, progress=False)
        out[name] = data, q_qd, p_nd
    return out


@pytest.mark.parametrize("name", ["cisi", "cranfield"])
def test_metrics_match_pytrec_eval_on_real_runs(encoded, name):
    data, q_qd, p_nd = encoded[name]
    scores_qk, rows_qk = search.search(q_qd, p_nd, top_k=100)
    ids_qk = np.array(data.corpus_ids, dtype=object)[rows_qk]
    if name == "cranfield":
        assert {g for r in data.qrels.values() for g in r.values()} >= {1, 2, 3, 4}  # graded
    assert_matches_pytrec(ids_qk, scores_qk, data.query_ids, data.qrels)


class Lookup:
    """An embedder that returns vectors encoded before (the pipeline tests need no second encode)."""

    def __init__(self, data, q_qd, p_nd):
        self.vectors = dict(zip(data.query_texts, q_qd)) | dict(zip(data.corpus_texts, p_nd))

    def encode(self, texts, **_):
        return np.stack([self.vectors[t] for t in texts])


def test_shards_and_approximate_indexes(encoded):
    data = encoded["cisi"][0]
    minilm = Lookup(*encoded["cisi"])
    opts = dict(query_max_length=MAX_LENGTH, passage_max_length=MAX_LENGTH, top_k=100, progress=False)
    whole = run.evaluate_retrieval(lambda: minilm, data, run.EvalOptions(**opts))
    sharded = run.evaluate_retrieval(lambda: minilm, data, run.EvalOptions(shard_size=137, **opts))
    for k in ("ndcg_at_10", "recall_at_100", "map_at_100", "mrr_at_10"):
        assert sharded[k] == pytest.approx(whole[k], abs=1e-6), k
    hnsw = run.evaluate_retrieval(lambda: minilm, data, run.EvalOptions(index="hnsw", **opts))
    assert hnsw["recall_vs_exact_at_10"] > 0.95 and hnsw["exact_ndcg_at_10"] == pytest.approx(whole["ndcg_at_10"])
    ivf = run.evaluate_retrieval(lambda: minilm, data, run.EvalOptions(index="ivf", nlist=16, nprobe=4, **opts))
    assert 0.3 < ivf["recall_vs_exact_at_10"] <= 1.0


def test_cli_writes_json_and_reuses_the_cache(tmp_path, shared_data, minilm_dir, encoded, capsys):
    data = encoded["cranfield"][0]
    folder = tmp_path / "cran_small"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                                 for i, t in zip(data.corpus_ids, data.corpus_texts)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                                  for i, t in zip(data.query_ids, data.query_texts)))
    (folder / "qrels" / "test.tsv").write_text("".join(f"{q}\t{d}\t{g}\n" for q, r in data.qrels.items()
                                                       for d, g in r.items()))
    argv = ["--model", minilm_dir, "--data", str(folder), "--max_seq_length", str(MAX_LENGTH),
            "--output_folder", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--top_k", "100"]
    first = eval_main(argv)[0]
    assert first["cache_hits"] == 0
    saved = json.loads((tmp_path / "out" / "cran_small.json").read_text())
    assert saved["ndcg_at_10"] == first["ndcg_at_10"] and 0 < saved["ndcg_at_10"] < 1
    assert "| cran_small |" in capsys.readouterr().out
    second = eval_main(argv)[0]
    assert second["cache_hits"] == 2 and second["encode_seconds"] == 0
    assert second["ndcg_at_10"] == first["ndcg_at_10"]
    third = eval_main(argv + ["--query_instruction", "query: "])[0]  # a changed option re-encodes the queries only
    assert third["cache_hits"] == 1


def test_mteb_on_the_same_local_data_agrees(encoded):
    from dret.eval.mteb_model import MtebModel, evaluate_tasks, local_task

    data = encoded["cisi"][0]
    embedder = Lookup(*encoded["cisi"])
    embedder.dim, embedder.max_length = 384, MAX_LENGTH
    ours = run.evaluate_retrieval(lambda: embedder, data, run.EvalOptions(top_k=100, progress=False))
    theirs = evaluate_tasks(MtebModel(embedder), [local_task(data)])[0]
    for k in ("ndcg_at_10", "mrr_at_10", "map_at_10", "recall_at_10", "recall_at_100", "precision_at_10"):
        assert theirs[k] == pytest.approx(ours[k], abs=1e-5), k  # mteb rounds to 5 decimals
