"""Data set loaders: BEIR folders, T2Ranking and MS MARCO-Title files, and their bad-input messages."""

import json
import subprocess
import sys

import pytest

from dret.errors import DretError
from dret.eval import datasets


def write_beir(folder, corpus, queries, qrels, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return folder


CORPUS = [{"_id": "d1", "title": "Cats", "text": "Cats purr."}, {"_id": "d2", "title": "", "text": "Dogs bark."},
          {"_id": "d3", "text": "Birds sing."}]
QUERIES = [{"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "what barks"}, {"_id": "q3", "text": "unjudged"}]


def test_beir_folder(tmp_path):
    data = datasets.load_beir(str(write_beir(tmp_path / "toy", CORPUS, QUERIES, [("q1", "d1", 2), ("q2", "d2", 1)])))
    assert data.name == "toy"
    assert data.corpus_texts == ["Cats Cats purr.", "Dogs bark.", "Birds sing."]  # title + " " + text, stripped
    assert data.query_ids == ["q1", "q2"]  # only queries named in the split's qrels
    assert data.qrels == {"q1": {"d1": 2}, "q2": {"d2": 1}}
    assert data.skipped_qrels == 0


def test_unknown_ids_in_qrels_are_warned_and_counted(tmp_path):
    folder = write_beir(tmp_path / "toy", CORPUS, QUERIES, [("q1", "d1", 1), ("q1", "nodoc", 1), ("noq", "d2", 1)])
    with pytest.warns(UserWarning, match="skipped 2 qrels lines"):
        data = datasets.load_beir(str(folder))
    assert data.skipped_qrels == 2 and data.qrels == {"q1": {"d1": 1}}


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_missing_files(tmp_path, missing):
    folder = write_beir(tmp_path / "toy", CORPUS, QUERIES, [("q1", "d1", 1)])
    (folder / missing).unlink()
    with pytest.raises(DretError, match="not found"):
        datasets.load_beir(str(folder))


def test_missing_folder_and_split(tmp_path):
    with pytest.raises(DretError, match="does not exist"):
        datasets.load_beir(str(tmp_path / "nothing"))
    folder = write_beir(tmp_path / "toy", CORPUS, QUERIES, [("q1", "d1", 1)])
    with pytest.raises(DretError, match="splits here: test"):
        datasets.load_beir(str(folder), "dev")


def test_duplicate_ids(tmp_path):
    folder = write_beir(tmp_path / "toy", CORPUS + [CORPUS[0]], QUERIES, [("q1", "d1", 1)])
    with pytest.raises(DretError, match=":4: duplicate id 'd1'"):
        datasets.load_beir(str(folder))


def test_empty_texts(tmp_path):
    folder = write_beir(tmp_path / "q", CORPUS, [{"_id": "q1", "text": " "}], [("q1", "d1", 1)])
    with pytest.raises(DretError, match="1 queries have empty text"):
        datasets.load_beir(str(folder))
    folder = write_beir(tmp_path / "p", CORPUS + [{"_id": "d4", "title": "", "text": ""}], QUERIES, [("q1", "d1", 1)])
    with pytest.warns(UserWarning, match="1 passages have empty text"):
        assert datasets.load_beir(str(folder)).corpus_texts[-1] == ""


def test_bad_json_line(tmp_path):
    folder = write_beir(tmp_path / "toy", CORPUS, QUERIES, [("q1", "d1", 1)])
    with open(folder / "corpus.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DretError, match="corpus.jsonl:4: expected a JSON object"):
        datasets.load_beir(str(folder))


def test_t2ranking(tmp_path):
    (tmp_path / "collection.tsv").write_text("pid\tpara\n0\t第一段\n1\t第二段\n2\t第三段\n")
    (tmp_path / "queries.dev.tsv").write_text("qid\ttext\n10\t问题一\n11\t问题二\n")
    (tmp_path / "qrels.retrieval.dev.tsv").write_text("qid\tpid\n10\t0\n10\t2\n11\t1\n")
    data = datasets.load_t2ranking(str(tmp_path))
    assert data.corpus_ids == ["0", "1", "2"] and data.corpus_texts[1] == "第二段"  # the whole collection
    assert data.qrels == {"10": {"0": 1, "2": 1}, "11": {"1": 1}}
    (tmp_path / "collection.tsv").unlink()
    with pytest.raises(DretError, match="collection.tsv not found"):
        datasets.load_t2ranking(str(tmp_path))


def test_msmarco_title(tmp_path):
    (tmp_path / "corpus.tsv").write_text("0\tManhattan Project\tThe project succeeded.\n1\t\tNo title here.\n")
    (tmp_path / "queries.dev.tsv").write_text("5\twhat was the manhattan project\n")
    (tmp_path / "qrels.dev.tsv").write_text("5\t0\t0\t1\n")  # TREC: qid 0 pid grade
    data = datasets.load_msmarco_title(str(tmp_path))
    assert data.corpus_texts == ["Manhattan Project The project succeeded.", "No title here."]
    assert data.qrels == {"5": {"0": 1}}


def test_cli_messages(tmp_path):
    folder = write_beir(tmp_path / "toy", CORPUS, QUERIES, [("q1", "d1", 1)])
    cmd = [sys.executable, "-m", "dret.eval", "--model", str(tmp_path / "no_model"), "--data", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == f"dret: --model {tmp_path / 'no_model'} does not exist"
    (tmp_path / "empty_model").mkdir()
    cmd[4] = str(tmp_path / "empty_model")
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert "neither an HF model folder (config.json) nor a dret training output_dir" in out.stderr


def test_checkpoint_sweep_table_and_plot(tmp_path):
    from dret.eval import sweep

    rows = [{"step": s, "dataset": "toy", "ndcg_at_10": 0.1 * s, "mrr_at_10": 0.2, "recall_at_10": 0.3,
             "recall_at_100": 0.4} for s in (1, 2, 3)]
    assert sweep.table(rows).splitlines()[2] == "| 1 | toy | 10.00 | 20.00 | 30.00 | 40.00 |"
    sweep.plot(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000
    with pytest.raises(DretError, match="holds no checkpoints/ folder"):
        sweep.checkpoint_steps(str(tmp_path))
