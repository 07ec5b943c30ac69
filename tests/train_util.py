"""Tiny training configs and helpers shared by the training tests."""

import json
import os
import subprocess
import sys

from ml_configs import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, **overrides):
    """A 2-layer, 64-wide random model on the built-in data: 8 devices x 1 query x group 2."""
    c = quickstart.get_config()
    c.tiny = True
    c.output_dir = str(tmp_path / "run")
    c.data_cache_dir = str(tmp_path / "cache")
    c.per_device_train_batch_size = 1
    c.train_group_size = 2
    c.query_max_len = 16
    c.passage_max_len = 32
    c.max_steps = 4
    c.save_steps = 2
    c.logging_steps = 1
    c.warmup_steps = 1
    for key, value in overrides.items():
        c[key] = value
    return c


def config_flags(config) -> list[str]:
    """The --config.key=value flags that turn quickstart.py into `config`."""
    base = quickstart.get_config()
    flags = []
    for key, value in config.items():
        if key != "mesh" and base[key] != value:
            flags.append(f"--config.{key}={value}")
    return flags


def train_command(config) -> list[str]:
    return [sys.executable, "-m", "dret.train", "--config", os.path.join(ROOT, "ml_configs", "quickstart.py"),
            *config_flags(config)]


def run_train(config, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(config), cwd=ROOT, capture_output=True, text=True, **kwargs)


def new_run(config, devices=None):
    """`build_run` of a config checked as the trainer checks it."""
    from dret.build import build_run
    from dret.config_check import validate

    return build_run(config, validate(config), devices)


def small_beir(folder):
    """A 12-document, 3-query BEIR folder (each query's document about its topic) at `folder` (a pathlib.Path)."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": f"title {i}",
                                                             "text": f"document {i} about topic {i % 3}"}) + "\n"
                                                 for i in range(12)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"topic {i}"}) + "\n"
                                                  for i in range(3)))
    (folder / "qrels" / "test.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in range(3)))
    return folder
