"""Every command of the README, run from a new folder as a user would type it, in the README's order. The README's
placeholders become local files, and the commands sized for real hardware get size flags (listed in RUN)."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.train_util import ROOT

README = pathlib.Path(ROOT, "README.md").read_text()
SMALL_TRAIN = ["--config.per_device_train_batch_size=1", "--config.passage_max_len=32", "--config.save_steps=1"]
SMALL_MODEL = ["--config.use_matryoshka=False"]  # rocketqa.py's Matryoshka dims exceed the small model's 64
# README command -> (folder it runs in, placeholder substitutions, size flags added, expected exit status)
RUN = {
    "python -m dret.train --config ml_configs/rocketqa.py --config.model_name_or_path=path/to/hf_model "
    "--config.train_data=data/train.jsonl --config.output_dir=runs/rocketqa":
        ("real", {}, ["--config.max_steps=1", *SMALL_TRAIN, *SMALL_MODEL], 0),
    "python -m dret.train --config ml_configs/rocketqa.py --config.tiny=True --config.train_data= --config.max_steps=2":
        ("work", {}, SMALL_TRAIN, 0),
    "python -m dret.train --config ml_configs/rocketqa.py --config.model_name_or_path=path/to/hf_model "
    "--config.train_data=data/train.jsonl --config.dry_run=True":
        ("work", {}, [*SMALL_TRAIN, *SMALL_MODEL], 0),
    "python -m dret.train --do_train --model_name_or_path path/to/hf_model --train_data data/train.jsonl --recompute":
        ("work", {}, ["--dry_run", *SMALL_TRAIN], 0),
    "python -m dret.export --checkpoint runs/rocketqa [--step N] --out hf_model/":
        ("work", {"[--step N]": "--step 1"}, [], 0),
    "python -m dret.plan --config ml_configs/xlmr_large.py --model_config ml_configs/xlm-roberta-large.json "
    "--devices 8 --device_memory 80GiB":
        ("work", {"ml_configs/xlm-roberta-large.json": "tiny_xlmr.json"}, ["--global_batch", "8"], 0),
    "python -m dret.eval --model runs/rocketqa/export --data ../shared/data/beir_scifact --max_seq_length 256":
        ("work", {"../shared/data/beir_scifact": "beir"}, [], 0),
    "python -m dret.eval --model runs/rocketqa --step 500 --data DIR":
        ("work", {"500": "2", "DIR": "beir"}, [], 0),
    "python -m dret.eval --model DIR --mteb SciFact":  # offline: one line saying to evaluate a local copy
        ("work", {"DIR": "hf_model"}, [], 2),
    "python -m dret.eval --model_type bert --query_model QUERY_DIR --passage_model PASSAGE_DIR --query_max_length 64 "
    "--passage_max_length 512 --t2ranking T2RANKING_DIR":
        ("work", {"QUERY_DIR": "path/to/hf_model", "PASSAGE_DIR": "runs/rocketqa/export",
                  "--t2ranking T2RANKING_DIR": "--data beir"}, [], 0),
    "python -m dret.eval --base_model_name_or_path DIR --output_folder eval_results/DIR --task_name DuRetrieval "
    "--eval_batch_size 8 --max_seq_length 2048 --task_split dev":  # offline: one line saying to use a local copy
        ("work", {"DIR": "hf_model"}, [], 2),
}


def readme_commands() -> list[str]:
    """The `python -m dret.*` lines of the README's code blocks, continuations joined, comments dropped."""
    lines = README.replace("\\\n", " ").splitlines()
    return [" ".join(line.split("#")[0].split()) for line in lines if line.strip().startswith("python -m dret.")]


def _small_hf_model(folder: pathlib.Path, minilm_dir: str) -> None:
    """An HF / sentence-transformers folder of a 2-layer, 64-wide BERT (random weights) on MiniLM's tokenizer:
    a real model folder that trains in seconds."""
    import transformers
    from flax import nnx

    from dret import models
    from dret.hf_io import read_config
    from dret.model import Embedder
    from dret.models.bert import TINY

    hf = {**read_config(minilm_dir), **TINY}
    Embedder(models.build(hf, rngs=nnx.Rngs(0)), transformers.AutoTokenizer.from_pretrained(minilm_dir), hf,
             pooling="cls").save(str(folder))


def _folders(tmp_path, minilm_dir) -> dict[str, pathlib.Path]:
    """Two new folders with the README's relative paths: ml_configs/, data/train.jsonl, a BEIR folder, a small
    config.json for dret.plan (compiling XLM-R large's step takes ~10 minutes) and a small HF model folder."""
    rows = [{"query": f"what is item {i}?", "pos": [f"item {i} is a thing"], "neg": [f"item {i + 1} is not"]}
            for i in range(24)]
    beir = {"corpus.jsonl": [{"_id": f"d{i}", "title": "", "text": f"document {i}"} for i in range(12)],
            "queries.jsonl": [{"_id": f"q{i}", "text": f"query {i}"} for i in range(4)]}
    xlmr = json.loads(pathlib.Path(ROOT, "ml_configs", "xlm-roberta-large.json").read_text())
    _small_hf_model(tmp_path / "hf_model", minilm_dir)
    folders = {}
    for name in ("work", "real"):
        folder = folders[name] = tmp_path / name
        (folder / "data").mkdir(parents=True)
        (folder / "ml_configs").symlink_to(pathlib.Path(ROOT, "ml_configs"))
        (folder / "path" / "to").mkdir(parents=True)
        (folder / "path" / "to" / "hf_model").symlink_to(tmp_path / "hf_model")
        (folder / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "beir" / "qrels").mkdir(parents=True)
        for file, items in beir.items():
            (folder / "beir" / file).write_text("".join(json.dumps(x) + "\n" for x in items))
        (folder / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                                            "".join(f"q{i}\td{i}\t1\n" for i in range(4)))
        (folder / "tiny_xlmr.json").write_text(json.dumps({**xlmr, "hidden_size": 64, "num_hidden_layers": 2,
                                                           "num_attention_heads": 4, "intermediate_size": 128}))
    return folders


def test_every_readme_command_has_a_run():
    assert readme_commands() == list(RUN), "a README command changed: update RUN (and run it)"


def test_readme_commands_run_as_written(tmp_path, minilm_dir):
    folders = _folders(tmp_path, minilm_dir)
    env = {**os.environ, "PYTHONPATH": ROOT, "DRET_CACHE": str(tmp_path / "cache")}
    for command, (where, placeholders, size_flags, status) in RUN.items():
        for placeholder, local in placeholders.items():
            command = command.replace(placeholder, local)
        argv = [sys.executable, *shlex.split(command)[1:], *size_flags]
        result = subprocess.run(argv, cwd=folders[where], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == status, f"{command}: {result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{command}: {result.stderr[-3000:]}"
        if status:
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith("dret: ") and "--data" in last, f"{command}: {last}"
    work = folders["work"]
    assert (work / "hf_model" / "model.safetensors").exists() and (work / "runs/rocketqa/export/modules.json").exists()
    assert sorted(os.listdir(work / "eval_results")) == ["beir.json"]
    assert (folders["real"] / "runs/rocketqa/export/model.safetensors").exists()


def test_readme_python_example(tmp_path, minilm_dir, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block.replace("path/to/all-MiniLM-L6-v2", minilm_dir), namespace)
    assert namespace["vectors"].shape == (1, 384)
    assert sorted(os.listdir(tmp_path)) == ["exported"] and (tmp_path / "exported" / "model.safetensors").exists()
    with pytest.raises(Exception, match="exists"):  # a second save does not overwrite the first
        namespace["model"].save("exported/")


HIDE_TORCH = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec  # torch hidden, as on a machine without it (dret's runtime install has none)
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else find_spec(name, *a, **k)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_commands_print_no_third_party_notices(tmp_path):
    """What a new user reads first is dret's own output: no transformers "PyTorch was not found" notice and no
    jax "Unable to initialize backend" line (JAX_PLATFORMS unset, as on a user's machine), torch hidden."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = ROOT
    commands = {
        "dret.train": ["--config", os.path.join(ROOT, "ml_configs", "rocketqa.py"), "--config.tiny=True",
                       "--config.train_data=", f"--config.output_dir={tmp_path / 'run'}",
                       f"--config.data_cache_dir={tmp_path / 'cache'}", "--config.dry_run=True"],
        "dret.eval": ["--model", str(tmp_path / "missing"), "--data", str(tmp_path)],
    }
    for module, args in commands.items():
        result = subprocess.run([sys.executable, "-c", HIDE_TORCH, module, *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        for notice in ("PyTorch was not found", "Unable to initialize backend", "DeprecationWarning"):
            assert notice not in result.stderr, f"{module}: {result.stderr[-3000:]}"
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"dret: --model {tmp_path / 'missing'} does not exist"]
