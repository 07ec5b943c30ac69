"""Training data edge cases: every bad file or row is one `file:line` DretError (or a skipped, counted row);
very long rows are cut by characters before tokenising; config overrides and numbers are checked up front."""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
import transformers

from dret import data as data_lib
from dret.config_check import validate
from dret.data import TrainData
from dret.errors import DretError
from tests.train_util import ROOT, tiny_config

GOOD = json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}).encode()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def _make(tokenizer, train_data, tmp_path, **kw):
    args = {"global_batch_size": 1, "group_size": 2, "query_max_len": 8, "passage_max_len": 8,
            "cache_dir": str(tmp_path / "cache")}
    return TrainData(str(train_data), tokenizer, **{**args, **kw})


def _error(tokenizer, train_data, tmp_path, **kw) -> str:
    with pytest.raises(DretError) as info:
        _make(tokenizer, train_data, tmp_path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _file(tmp_path, content: bytes):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("line,what", [
    (rb'{"query": "a\ud800", "pos": ["b"]}', r"'query' has a lone surrogate \(\\ud800 at character 1\)"),
    (rb'{"query": "a", "pos": ["b", "\udfff"]}', r"'pos' item 1 has a lone surrogate \(\\udfff at character 0\)"),
    (rb'{"query": "a", "pos": ["b"], "neg": ["c\uDBFFd"]}', r"'neg' item 0 has a lone surrogate \(\\udbff"),
    (b'{"query": "a\xed\xa0\x80", "pos": ["b"]}', r"not valid UTF-8 \(byte 0xed at byte 13\)"),  # an encoded surrogate
    (b'{"query": "\xff", "pos": ["b"]}', r"not valid UTF-8 \(byte 0xff at byte 12\)"),
    (b"[" * 100_000, r"not valid JSON \(maximum recursion depth exceeded"),
    (b'{"query": "a\x00", "pos": ["b"]}', r"not valid JSON \(Invalid control character"),
    (b"\x00\x00\x00", r"not valid JSON \(Expecting value"),
])
def test_bad_text_is_a_bad_row(tokenizer, tmp_path, line, what):
    path = _file(tmp_path, GOOD + b"\n" + line + b"\n" + GOOD + b"\n")
    assert re.match(rf"{re.escape(str(path))}:2: {what}", _error(tokenizer, path, tmp_path))
    assert not os.listdir(tmp_path / "cache")


def test_lone_surrogate_skipped_and_counted(tokenizer, tmp_path, caplog):
    path = _file(tmp_path, GOOD + b'\n{"query": "a\\ud800", "pos": ["b"]}\n' + GOOD + b"\n")
    with caplog.at_level(logging.WARNING, logger="dret.data"):
        data = _make(tokenizer, path, tmp_path, skip_bad_rows=True)
    assert len(data) == 2 and len(list(data.batches(2))) == 2
    assert any(f"skipped 1 bad rows of {path} (first: {path}:2: 'query' has a lone surrogate" in r.getMessage()
               for r in caplog.records)


def test_surrogate_pair_escape_is_one_character(tokenizer, tmp_path):
    path = _file(tmp_path, b'{"query": "smile \\ud83d\\ude00", "pos": ["b"], "neg": ["c"]}\n' + GOOD + b"\n")
    data = _make(tokenizer, path, tmp_path)
    assert "smile \U0001F600" in data.rows["query"]


def test_byte_order_marks_are_ignored(tokenizer, tmp_path):
    bom = b"\xef\xbb\xbf"
    path = _file(tmp_path, bom + GOOD + b"\n" + GOOD + b"\n" + bom + GOOD + b"\n")  # e.g. two files concatenated
    assert len(_make(tokenizer, path, tmp_path)) == 3


def test_utf16_file_is_not_utf8(tokenizer, tmp_path):
    path = _file(tmp_path, (GOOD.decode() + "\n").encode("utf-16"))
    assert _error(tokenizer, path, tmp_path).startswith(f"{path}:1: not valid UTF-8 (byte 0xff at byte 1)")


def test_empty_file(tokenizer, tmp_path):
    path = _file(tmp_path, b"")
    assert _error(tokenizer, path, tmp_path) == f"{path}: no training rows"


@pytest.mark.parametrize("case", ["dir_named_jsonl", "broken_symlink", "device", "unreadable"])
def test_train_data_that_is_not_a_readable_file(tokenizer, tmp_path, monkeypatch, case):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(GOOD + b"\n")
    bad, train_data, what = folder / "b.jsonl", folder, "not a regular file"
    if case == "dir_named_jsonl":
        bad.mkdir()
    elif case == "broken_symlink":
        bad.symlink_to(tmp_path / "gone.jsonl")
        what = "no such file or directory"
    elif case == "device":
        bad = train_data = "/dev/null"
    else:
        bad.write_bytes(GOOD + b"\n")
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: p != str(bad) and real_access(p, mode))  # root reads all
        what = "permission denied"
    assert _error(tokenizer, train_data, tmp_path) == f"train_data {bad}: {what}"


def test_long_text_cut_by_characters_before_tokenising(tokenizer, tmp_path, monkeypatch):
    max_len = 8
    bound = max_len * data_lib.MAX_CHARS_PER_TOKEN
    words = " ".join(f"w{i}" for i in range(bound))  # normal text just over the bound
    huge = "x" * 5_000_000
    rows = [{"query": words, "pos": [words], "neg": [huge]}, {"query": huge, "pos": [huge], "neg": [words]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = _make(tokenizer, path, tmp_path, query_max_len=max_len, passage_max_len=max_len)
    seen = []
    real_call = type(data._tokenizer).__call__
    monkeypatch.setattr(type(data._tokenizer), "__call__", lambda self, texts, **kw: (
        seen.extend(map(len, texts)), real_call(self, texts, **kw))[1])
    batches = list(data.batches(2))
    assert seen and max(seen) <= bound and len(words) > bound
    expected = tokenizer(words, max_length=max_len, truncation=True)["input_ids"]
    query_rows = [list(b["query_ids"][0]) for b in batches]
    assert expected in query_rows


# --- config ---

@pytest.mark.parametrize("key,value,needle", [
    ("learning_rate", float("inf"), "learning_rate=inf: expected a finite number > 0"),
    ("learning_rate", float("nan"), "learning_rate=nan: expected a finite number > 0"),
    ("learning_rate", -1e-5, "learning_rate=-1e-05: expected a finite number > 0"),
    ("temperature", float("inf"), "temperature=inf: expected a finite number > 0"),
    ("weight_decay", float("nan"), "weight_decay=nan: expected a finite number >= 0"),
    ("max_grad_norm", -1.0, "max_grad_norm=-1.0: expected a finite number >= 0"),
    ("margin", float("-inf"), "margin=-inf: expected a finite number"),
    ("warmup_steps", -1, "warmup_steps=-1: expected a finite number >= 0"),
    ("seed", -1, "seed=-1: expected an integer in [0, 2**32)"),
    ("lora_alpha", 0, "lora_alpha=0: expected a finite number > 0"),
    ("lora_dropout", float("nan"), "lora_dropout=nan: expected a finite number in [0, 1)"),
    ("matryoshka_loss_weights", (1.0, float("inf"), 1.0), "matryoshka_loss_weights (1.0, inf, 1.0): expected"),
    ("matryoshka_dims", (64, 0, 384), "matryoshka_dims (64, 0, 384): expected positive integers"),
    ("matryoshka_dims", ("64", "x", "384"), "matryoshka_dims ('64', 'x', '384'): expected positive integers"),
])
def test_numbers_must_be_finite_and_in_range(tmp_path, key, value, needle):
    config = tiny_config(tmp_path, use_matryoshka=True, fine_tune_type="lora")
    config[key] = value
    with pytest.raises(DretError) as info:
        validate(config)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_tiny_with_a_mistyped_train_data_is_an_error(tmp_path):
    with pytest.raises(DretError, match=r"train_data='/nonexistent/train\.jsonl' does not exist"):
        validate(tiny_config(tmp_path, train_data="/nonexistent/train.jsonl"))


def test_tiny_without_train_data_uses_builtin_data(tmp_path):
    from dret.resources import resolve_train_data
    config = tiny_config(tmp_path, train_data="")
    validate(config)
    assert resolve_train_data(config) == os.path.join(config.output_dir, "data", "train.jsonl")


def test_base_config_names_the_real_data_cache(tokenizer, tmp_path, monkeypatch):
    import datasets

    from ml_configs import base
    (comment,) = re.findall(r'c\.data_cache_dir = "" +# (.*)', pathlib.Path(base.__file__).read_text())
    assert "~/.cache/huggingface/datasets/dret_train ($HF_DATASETS_CACHE)" in comment
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    _make(tokenizer, _file(tmp_path, GOOD + b"\n"), tmp_path, cache_dir=None)
    (cached,) = os.listdir(tmp_path / "hf" / "dret_train")
    assert cached.startswith("t.jsonl-")


def _train(*flags):
    return subprocess.run([sys.executable, "-m", "dret.train", "--config", "ml_configs/quickstart.py", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("flag,line", [
    ("--config.learning_rat=1e-5", "dret: unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("--config.mesh.dat=2", "dret: unknown config key 'mesh.dat' (did you mean 'mesh.data'?)"),
    ("--config.zzz=1", "dret: unknown config key 'zzz'"),
    ("--config.learning_rate.x=1", "dret: unknown config key 'learning_rate.x' (learning_rate is a float)"),
    ("--config.learning_rate=abc", "dret: flag --config.learning_rate=abc: could not convert string to float: 'abc'"),
])
def test_bad_override_is_one_line(flag, line):
    result = _train(flag)
    assert (result.returncode, result.stderr.strip()) == (2, line)
    assert not result.stdout


def test_missing_config_file_is_one_line():
    result = subprocess.run([sys.executable, "-m", "dret.train", "--config", "ml_configs/nope.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("dret: --config ml_configs/nope.py: "
                                     "[Errno 2] No such file or directory: 'ml_configs/nope.py'")
