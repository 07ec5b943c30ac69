"""`--model` / `--evaluate_all` on a dret training output_dir (a tiny LoRA run, adapters merged on load)."""

import json
import shutil

import jax.numpy as jnp
import pytest

from dret.eval import model_dir
from dret.eval.__main__ import main as eval_main
from dret.trainer import train_and_evaluate
from dret.resources import bundled_minilm
from tests.train_util import tiny_config


def test_training_output_dir_evaluates_latest_and_every_step(tmp_path):
    config = tiny_config(tmp_path, fine_tune_type="lora", lora_rank=4, max_steps=2, save_steps=1)
    export_dir = train_and_evaluate(config)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"document {i} topic {i % 3}"})
                                               + "\n" for i in range(12)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"topic {i}"}) + "\n"
                                                for i in range(3)))
    (beir / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(3)))
    common = ["--data", str(beir), "--output_folder", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "c")]
    in_flight = tmp_path / "run" / "checkpoints" / "3.orbax-checkpoint-tmp-1733300000"  # a save still being written
    in_flight.mkdir()
    latest = eval_main(["--model", config.output_dir, *common])[0]
    exported = eval_main(["--model", export_dir, *common])[0]  # the same step-2 weights, merged at the run's end
    assert latest["step"] is None
    for metric in ("ndcg_at_10", "mrr_at_10", "recall_at_10"):
        assert latest[metric] == pytest.approx(exported[metric], abs=1e-6), metric
    rows = eval_main(["--evaluate_all", "--checkpoint_dir", config.output_dir, *common])
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["ndcg_at_10"] == latest["ndcg_at_10"]  # the latest step is step 2
    assert (tmp_path / "out" / "checkpoints.png").exists()
    assert in_flight.is_dir()  # evaluating a run that is still training leaves its save alone


def test_lora_cache_key_covers_the_base_model_and_dtype_applies(tmp_path):
    """A LoRA checkpoint holds adapters only: the cache key must change when the base model's files do."""
    base = tmp_path / "base"
    shutil.copytree(bundled_minilm(), base, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "openvino"))
    config = tiny_config(tmp_path, model_name_or_path=str(base), fine_tune_type="lora", lora_rank=4, max_steps=1,
                         save_steps=1)
    train_and_evaluate(config)
    load, key, _ = model_dir.resolve(config.output_dir)
    _, key_bf16, _ = model_dir.resolve(config.output_dir, dtype="bfloat16")
    (base / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))
    _, key_after, _ = model_dir.resolve(config.output_dir)
    assert len({key, key_bf16, key_after}) == 3
    assert load().backbone.dtype == jnp.float32
    assert model_dir.resolve(config.output_dir, dtype="bfloat16")[0]().backbone.dtype == jnp.bfloat16
