"""Exports describe themselves: the `make demo` export's README.md is YAML front matter + markdown naming the base
model, its license and the held-out metrics; `dret.eval --update_model_card` appends a results table; and
sentence-transformers still loads the folder."""

import dataclasses

import numpy as np
import yaml

from dret import demo
from dret.eval.__main__ import main as eval_main
from dret.model import Embedder
from ml_configs import quickstart
from tests.test_eval_datasets import write_beir


def _card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_demo_export_card_names_base_and_held_out_metrics_and_eval_appends(tmp_path, monkeypatch, capsys):
    config = quickstart.get_config()
    config.update(output_dir=str(tmp_path / "run"), data_cache_dir=str(tmp_path / "cache"), max_steps=1,
                  per_device_train_batch_size=1, query_max_len=16, passage_max_len=32)
    monkeypatch.setattr(quickstart, "get_config", lambda arg=None: config)
    full = demo.held_out_retrieval()  # a slice of it: the card, not the numbers, is under test
    kept = set(full.query_ids[:10])
    monkeypatch.setattr(demo, "held_out_retrieval", lambda: dataclasses.replace(
        full, corpus_ids=full.corpus_ids[:100], corpus_texts=full.corpus_texts[:100],
        query_ids=[q for q in full.query_ids if q in kept], query_texts=full.query_texts[:10],
        qrels={q: full.qrels[q] for q in kept}))
    demo.main()
    printed = capsys.readouterr().out
    export = tmp_path / "run" / "export"
    meta, body = _card(export)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "sentence-transformers" and "dret" in meta["tags"]
    fine_tuned = next(line for line in printed.splitlines() if line.startswith("| fine-tuned |"))
    assert "## Held-out evaluation (stdlib-docs held-out)" in body and fine_tuned in body
    assert "Training metrics at step 1:" in body and '"learning_rate": 5e-05' in body

    beir = write_beir(tmp_path / "beir", [{"_id": f"d{i}", "title": "", "text": f"note {i}"} for i in range(6)],
                      [{"_id": "q0", "text": "note 0"}], [("q0", "d0", 1)])
    result = eval_main(["--model", str(export), "--data", str(beir), "--update_model_card", "--no_cache",
                        "--output_folder", str(tmp_path / "out")])[0]
    meta_after, body_after = _card(export)
    assert meta_after == meta and body_after.startswith(body.rstrip())
    assert "## Evaluation (dret.eval, split default)" in body_after and f"{100 * result['ndcg_at_10']:.2f}" in body_after

    from sentence_transformers import SentenceTransformer
    texts = ["how do I open a file?", "os.path.join joins paths"]
    theirs = SentenceTransformer(str(export), device="cpu").encode(texts, normalize_embeddings=True)
    ours = Embedder.from_pretrained(str(export)).encode(texts, progress=False)
    assert (theirs * ours).sum(1).min() > 0.9999 and np.isfinite(ours).all()
