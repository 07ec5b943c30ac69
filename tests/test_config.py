"""Every config loads; impossible settings and bad files stop the run with one clear line, output_dir usable."""

import importlib
import os
import pathlib
import subprocess

import pytest

from dret.errors import DretError
from dret.trainer import train_and_evaluate
from tests.train_util import ROOT, tiny_config, train_command

CONFIGS = sorted(p.stem for p in pathlib.Path(ROOT, "ml_configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads(name):
    config = importlib.import_module(f"ml_configs.{name}").get_config()
    assert config.train_group_size >= 1 and config.output_dir


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
    "passage longer than positions": ({"tiny": False, "passage_max_len": 4096}, "max_position_embeddings"),
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
