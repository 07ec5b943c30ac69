"""Every config loads; impossible settings and bad files stop the run with one clear line, output_dir usable."""

import importlib
import logging
import os
import pathlib
import subprocess

import jax
import numpy as np
import pytest

from dret.errors import DretError
from dret.sharding import batch_sharding
from dret.trainer import train_and_evaluate
from tests.train_util import ROOT, new_run, tiny_config, train_command

# the decoder recipes train two steps as written (tiny) in tests/test_decoder_training.py and tests/test_recipes.py
RECIPES = ("repllama", "nv_embed", "bge_en_icl", "llara")
CONFIGS = sorted(p.stem for p in pathlib.Path(ROOT, "ml_configs").glob("*.py") if p.stem not in ("__init__", *RECIPES))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_a_tiny_run_and_takes_a_step(name, tmp_path):
    """Each config as written (precision, sharding, recompute, LoRA, Matryoshka, group size), shrunk to a tiny
    random model of its family on the built-in data, one query per device, short texts and at most 2 micro-batches
    (the scan over them compiles once, whatever their number)."""
    config = importlib.import_module(f"ml_configs.{name}").get_config()
    config.update(tiny=True, train_data="", output_dir=str(tmp_path / "run"), data_cache_dir=str(tmp_path / "cache"),
                  per_device_train_batch_size=1, query_max_len=16, passage_max_len=32, max_steps=1,
                  gradient_accumulation_steps=min(config.gradient_accumulation_steps, 2))
    run = new_run(config)
    batch = {k: jax.make_array_from_process_local_data(batch_sharding(run.mesh), v)
             for k, v in next(iter(run.data.batches(1))).items()}
    state, metrics = run.step_fn(run.state, batch, run.step_config)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and not int(metrics["skipped"])


BAD_CONFIGS = {
    "fp16 with bf16": ({"fp16": True, "bf16": True}, "fp16 and bf16"),
    "matryoshka dim above hidden size": ({"tiny": False, "use_matryoshka": True, "matryoshka_dims": (64, 512),
                                          "matryoshka_loss_weights": (1.0, 1.0)},
                                         "exceed the model's hidden size 384"),
    "matryoshka weights length": ({"use_matryoshka": True, "matryoshka_loss_weights": (1.0,)},
                                  "matryoshka_loss_weights"),
    "no negatives at all": ({"train_group_size": 1, "per_device_train_batch_size": 1,
                             "negatives_cross_device": False}, "leaves no negatives"),
    "in-batch with a group": ({"use_inbatch_neg": True, "train_group_size": 4}, "set train_group_size=1"),
    "unknown fine_tune_type": ({"fine_tune_type": "full"}, "fine_tune_type='full'"),
    "unknown pooling": ({"sentence_pooling_method": "max"}, "sentence_pooling_method='max'"),
    "bad sharding": ({"sharding": "stage4"}, "sharding='stage4'"),
    "bad fp16_opt_level": ({"fp16": True, "fp16_opt_level": "O3"}, "fp16_opt_level='O3'"),
    "zero temperature": ({"temperature": 0.0}, "temperature=0.0"),
    "passage longer than positions": ({"tiny": False, "passage_max_len": 4096}, "the model's longest text"),
    "missing train_data": ({"tiny": False, "train_data": "/nonexistent/train.jsonl"}, "/nonexistent/train.jsonl"),
    "missing model folder": ({"tiny": False, "model_name_or_path": "/nonexistent/model"}, "/nonexistent/model"),
    "lora on an unknown module": ({"fine_tune_type": "lora", "lora_target_modules": ("q_proj",)}, "q_proj"),
    "zero batch": ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_error_before_any_work(case, tmp_path):
    overrides, needle = BAD_CONFIGS[case]
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(DretError) as info:
        train_and_evaluate(config)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(config.output_dir)


def test_unknown_key_on_the_command_line(tmp_path):
    result = subprocess.run([*train_command(tiny_config(tmp_path))[:4], "--config.no_such_key=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no_such_key" in result.stderr


def test_bad_row_stops_before_training_and_output_dir_stays_usable(tmp_path):
    data = tmp_path / "train.jsonl"
    good = '{"query": "q%d", "pos": ["p%d"], "neg": ["n%d"]}\n'
    data.write_text("".join(good % (i, i, i) for i in range(20)) + '{"query": "x", "pos": []}\n')
    config = tiny_config(tmp_path, train_data=str(data), max_steps=2)
    with pytest.raises(DretError) as info:
        train_and_evaluate(config)
    assert f"{data}:21:" in str(info.value) and "\n" not in str(info.value)
    data.write_text("".join(good % (i, i, i) for i in range(20)))  # the user fixes the file and reruns
    train_and_evaluate(config)
    assert os.path.exists(os.path.join(config.output_dir, "export", "model.safetensors"))


def test_existing_unrelated_output_dir_is_not_touched(tmp_path):
    config = tiny_config(tmp_path)
    os.makedirs(config.output_dir)
    keep = pathlib.Path(config.output_dir, "notes.txt")
    keep.write_text("mine")
    with pytest.raises(DretError, match="overwrite_output_dir"):
        train_and_evaluate(config)
    assert keep.read_text() == "mine"


def test_settings_that_change_nothing_say_so(tmp_path, caplog):
    """The reference's use_flash_attention, fp16_opt_level=O2 and dret.eval's --padding_side are accepted for its
    command lines, and each says it changes nothing."""
    from dret.config_check import validate
    from dret.eval.__main__ import main as eval_main

    with caplog.at_level(logging.WARNING, logger="dret"):
        validate(tiny_config(tmp_path, use_flash_attention=True, fp16=True, fp16_opt_level="O2"))
        with pytest.raises(DretError, match="no data"):
            eval_main(["--model", str(tmp_path), "--padding_side", "left"])
    assert "use_flash_attention changes nothing" in caplog.text
    assert "fp16_opt_level=O2 computes as O1" in caplog.text
    assert "--padding_side left changes nothing" in caplog.text
