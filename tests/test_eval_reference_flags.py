"""The reference's two evaluation command lines (issue 16) run in `python -m dret.eval`: a dual encoder
(`--query_model A --passage_model B`) scores like a direct computation with A's queries and B's corpus, its corpus
cache depends on B only; `--base_model_name_or_path`, `--model_type`, `--task_name` / `--task_split`, and the one-line
errors of their misuse."""

import json
import logging
import os

import numpy as np
import pytest

from dret.dual_encoder import DualEncoder
from dret.errors import DretError, run_command
from dret.eval import datasets, metrics
from dret.eval.__main__ import main as eval_main
from tests.test_eval_datasets import write_beir

COMPARED = ("ndcg_at_10", "mrr_at_10", "recall_at_10", "map_at_10")


def _small_model(folder, minilm_dir: str, seed: int) -> str:
    """A 2-layer, 64-wide BERT with random weights (seed) on MiniLM's tokenizer, saved as an HF folder."""
    import transformers
    from flax import nnx

    from dret import models
    from dret.hf_io import read_config
    from dret.model import Embedder
    from dret.models.bert import TINY

    hf = {**read_config(minilm_dir), **TINY}
    Embedder(models.build(hf, rngs=nnx.Rngs(seed)), transformers.AutoTokenizer.from_pretrained(minilm_dir), hf,
             pooling="cls").save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_dir):
    """Two different small models (A, B), a BEIR folder with test and dev qrels, and a T2Ranking tsv folder."""
    root = tmp_path_factory.mktemp("reference_flags")
    topics = ["cats", "dogs", "rivers", "mountains", "violins", "engines", "bread", "comets", "tulips", "glaciers",
              "chess", "volcanoes"]
    corpus = [{"_id": f"d{i}", "title": t, "text": f"a short note about {t} and other things {i}"}
              for i, t in enumerate(topics)]
    queries = [{"_id": f"q{i}", "text": f"tell me about {t}"} for i, t in enumerate(topics[:8])]
    beir = write_beir(root / "beir", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(8)])
    write_beir(beir, corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(4)], split="dev")
    t2 = root / "t2ranking"
    t2.mkdir()
    (t2 / "collection.tsv").write_text("pid\tpara\n" + "".join(f"{i}\t{t} facts\n" for i, t in enumerate(topics)))
    (t2 / "queries.dev.tsv").write_text("qid\ttext\n" + "".join(f"{10 + i}\t{t}?\n" for i, t in enumerate(topics[:4])))
    (t2 / "qrels.retrieval.dev.tsv").write_text("qid\tpid\n" + "".join(f"{10 + i}\t{i}\n" for i in range(4)))
    return dict(a=_small_model(root / "A", minilm_dir, 0), b=_small_model(root / "B", minilm_dir, 1),
                beir=str(beir), t2ranking=str(t2))


def _pair(folders, a, b, tmp_path, *extra, data=None):
    """The reference's T2Ranking command (with a local BEIR folder, default the fixture's) on query model a and
    passage model b."""
    return eval_main(["--model_type", "bert", "--query_model", folders[a], "--passage_model", folders[b],
                      "--query_max_length", "64", "--passage_max_length", "512", "--data", data or folders["beir"],
                      "--output_folder", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), *extra])[0]


def _direct(folders, data=None) -> dict:
    """Queries encoded by A, the corpus by B, numpy cosine ranking, dret.eval.metrics."""
    data = datasets.load_beir(data or folders["beir"])
    pair = DualEncoder.from_pretrained(folders["a"], folders["b"])
    q_qd = pair.encode_queries(data.query_texts, max_length=64, progress=False)
    p_nd = pair.encode_corpus(data.corpus_texts, max_length=512, progress=False)
    scores_qn = q_qd @ p_nd.T
    rows_qn = np.argsort(-scores_qn, axis=1, kind="stable")
    ids_qn = np.array(data.corpus_ids, dtype=object)[rows_qn]
    return metrics.evaluate(ids_qn, data.query_ids, data.qrels, scores=np.take_along_axis(scores_qn, rows_qn, 1))


def test_dual_encoder_equals_direct_computation_and_caches_the_corpus_by_passage_model(folders, tmp_path,
                                                                                      monkeypatch):
    from dret.eval import model_dir
    loaded = []
    from_pretrained = model_dir.Embedder.from_pretrained
    monkeypatch.setattr(model_dir.Embedder, "from_pretrained",
                        lambda path, **kw: loaded.append(path) or from_pretrained(path, **kw))

    ab = _pair(folders, "a", "b", tmp_path)
    assert loaded == [folders["a"], folders["b"]] and ab["cache_hits"] == 0  # each side loaded once
    direct = _direct(folders)
    assert {m: ab[m] for m in COMPARED} == pytest.approx({m: direct[m] for m in COMPARED}, abs=1e-6)
    assert ab["model"] == folders["a"] and ab["passage_model"] == folders["b"]
    saved = json.loads((tmp_path / "out" / "beir.json").read_text())
    assert saved["ndcg_at_10"] == ab["ndcg_at_10"]

    loaded.clear()
    bb = _pair(folders, "b", "b", tmp_path)  # another query model: B's corpus vectors come from the cache
    assert bb["cache_hits"] == 1 and loaded == [folders["b"]]
    loaded.clear()
    again = _pair(folders, "a", "b", tmp_path)  # everything cached: no model loaded
    assert again["cache_hits"] == 2 and loaded == [] and again["ndcg_at_10"] == ab["ndcg_at_10"]
    aa = _pair(folders, "a", "a", tmp_path)  # A's queries cached, A's corpus not
    assert aa["cache_hits"] == 1 and loaded == [folders["a"]]
    assert any(aa[m] != pytest.approx(ab[m], abs=1e-6) for m in COMPARED), "A/B must differ from A/A"


@pytest.mark.filterwarnings("ignore:cranfield. 2 passages have empty text")
def test_pair_on_cranfield_differs_from_one_model_and_equals_the_direct_computation(folders, shared_data, tmp_path):
    """Real data (Cranfield: 1,400 abstracts, 225 queries), two different (small, random) encoders, and the
    reference's MTEB command on it (the local copy under the task's name) equal to its T2Ranking one."""
    cranfield = str(shared_data / "cranfield")
    ab, aa = _pair(folders, "a", "b", tmp_path, data=cranfield), _pair(folders, "a", "a", tmp_path, data=cranfield)
    direct = _direct(folders, cranfield)
    assert {m: ab[m] for m in COMPARED} == pytest.approx({m: direct[m] for m in COMPARED}, abs=1e-6)
    assert all(aa[m] != pytest.approx(ab[m], abs=1e-4) for m in COMPARED), (aa, ab)
    mteb_command, = eval_main(["--base_model_name_or_path", folders["a"], "--output_folder", str(tmp_path / "A"),
                               "--task_name", "Cranfield", "--eval_batch_size", "8", "--max_seq_length", "512",
                               "--task_split", "test", "--data", cranfield, "--cache_dir", str(tmp_path / "cache")])
    assert mteb_command["dataset"] == "Cranfield" and mteb_command["num_queries"] == aa["num_queries"] == 225
    assert {m: mteb_command[m] for m in COMPARED} == {m: aa[m] for m in COMPARED}  # the reference's two commands


def test_mteb_scores_the_pair_like_the_direct_computation(folders):
    from dret.eval.mteb_model import MtebModel, evaluate_tasks, local_task

    pair = DualEncoder.from_pretrained(folders["a"], folders["b"])
    model = MtebModel(pair.query, passage_embedder=pair.passage, query_max_length=64, passage_max_length=512)
    theirs = evaluate_tasks(model, [local_task(datasets.load_beir(folders["beir"]))])[0]
    direct = _direct(folders)
    assert {m: theirs[m] for m in COMPARED} == pytest.approx({m: direct[m] for m in COMPARED}, abs=1e-5)  # mteb rounds


def test_reference_t2ranking_command_as_written(folders, tmp_path):
    argv = ["--model_type", "bert", "--query_model", folders["a"], "--passage_model", folders["b"],
            "--query_max_length", "64", "--passage_max_length", "512"]  # the reference README's, paths local
    result, = eval_main(argv + ["--t2ranking", folders["t2ranking"], "--output_folder", str(tmp_path), "--no_cache"])
    assert result["dataset"] == "t2ranking" and result["num_queries"] == 4 and 0 <= result["ndcg_at_10"] <= 1


def test_reference_mteb_command_with_a_local_copy_and_base_model_name(folders, tmp_path, caplog):
    out = tmp_path / "eval_results" / "A"
    with caplog.at_level(logging.WARNING, logger="dret"):
        result, = eval_main(["--base_model_name_or_path", folders["a"], "--output_folder", str(out),
                             "--task_name", "DuRetrieval", "--eval_batch_size", "8", "--max_seq_length", "2048",
                             "--task_split", "dev", "--data", folders["beir"], "--no_cache", "--model_type", "bert"])
    assert "--model_type bert changes nothing" in caplog.text
    assert result["dataset"] == "DuRetrieval" and result["split"] == "dev" and result["num_queries"] == 4
    assert os.listdir(out) == ["DuRetrieval.json"]
    same, = eval_main(["--model", folders["a"], "--output_folder", str(tmp_path / "same"), "--eval_batch_size", "8",
                       "--max_seq_length", "2048", "--split", "dev", "--data", folders["beir"], "--no_cache"])
    assert {m: same[m] for m in COMPARED} == {m: result[m] for m in COMPARED}


def _error(argv) -> str:
    with pytest.raises(DretError) as error:
        eval_main(argv)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_misused_flags_are_one_line_errors(folders, tmp_path):
    a, b, data = folders["a"], folders["b"], ["--data", folders["beir"], "--output_folder", str(tmp_path)]
    assert _error(["--model", a, "--base_model_name_or_path", a, *data]) == (
        "--model and --base_model_name_or_path name the same thing: pass one")
    assert _error(["--query_model", a, *data]).startswith("--query_model needs --passage_model")
    assert _error(["--passage_model", b, *data]).startswith("--passage_model needs --query_model")
    assert _error(["--base_model_name_or_path", a, "--query_model", a, "--passage_model", b, *data]).startswith(
        "--base_model_name_or_path and --query_model / --passage_model: pass one model")
    assert _error(["--query_model", a, "--passage_model", str(tmp_path / "missing"), *data]) == (
        f"--passage_model {tmp_path / 'missing'} does not exist")
    assert _error(["--model", a, "--model_type", "llama", *data]) == (
        f"--model_type llama contradicts {a}/config.json: its model_type is 'bert' (family bert)")
    assert _error(["--model", a, "--model_type", "gpt9", *data]).startswith("--model_type: model_type: expected")
    assert _error(["--model", a, "--task_name", "X", *data, "--data", folders["beir"]]) == (
        "--task_name X names one --data folder (its local copy), got 2")
    assert _error(["--model", a, "--task_name", "SciFact", "--task_split", "dev"]) == (
        "--task_name SciFact: mteb evaluates it on test, not on split 'dev'")


def test_task_name_offline_says_what_to_download(folders, tmp_path, capsys):
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    assert HF_HUB_OFFLINE  # conftest
    if os.path.isdir(os.path.join(HF_HUB_CACHE, "datasets--mteb--scifact")):
        pytest.skip(f"SciFact is in the HF cache {HF_HUB_CACHE}: it would be evaluated, not missing")
    with pytest.raises(SystemExit) as exit_:
        run_command(eval_main, ["--base_model_name_or_path", folders["a"], "--task_name", "SciFact",
                                "--task_split", "test", "--output_folder", str(tmp_path / "out")])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dret: --task_name SciFact: its data (mteb/scifact) could not be downloaded")
    assert HF_HUB_CACHE in last and last.endswith("with --task_name SciFact --data FOLDER instead")
    assert not (tmp_path / "out").exists()
