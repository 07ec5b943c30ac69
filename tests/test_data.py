"""data.py: group layout, sampling, determinism, exact resume, per-process slices, Arrow cache, bad input."""

import json
import logging
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import transformers

from dret import data as data_lib
from dret.data import TrainData
from dret.errors import DretError
from tests.train_util import ROOT


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def _row(i, n_pos=2, n_neg=3):
    return {"query": f"q {i}", "pos": [f"p {i} {j}" for j in range(n_pos)], "neg": [f"n {i} {j}" for j in range(n_neg)]}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _make(tokenizer, train_data, tmp_path, **kw):
    args = dict(global_batch_size=4, group_size=3, query_max_len=12, passage_max_len=12, cache_dir=str(tmp_path / "cache"))
    return TrainData(train_data, tokenizer, **{**args, **kw})


def _texts(tokenizer, ids):
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def _take(data, n):
    return [b for b in data.batches(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_layout_instructions_and_padding(tokenizer, tmp_path):
    rows = [_row(i) for i in range(8)]
    rows[0]["query"] = "q 0 " + "long " * 40
    path = _write(tmp_path / "t.jsonl", rows)
    data = _make(tokenizer, path, tmp_path, query_instruction="query: ", passage_instruction="passage: ")
    assert len(data) == 8 and data.steps_per_epoch == 2
    seen_long = False
    for batch in _take(data, 2):
        assert batch["query_ids"].shape == batch["query_mask"].shape == (4, 12)
        assert batch["passage_ids"].shape == batch["passage_mask"].shape == (12, 12)
        assert all(v.dtype == np.int32 for v in batch.values())
        for ids, mask in ((batch["query_ids"], batch["query_mask"]), (batch["passage_ids"], batch["passage_mask"])):
            n_real = mask.sum(1)
            np.testing.assert_array_equal(mask, (np.arange(12)[None] < n_real[:, None]).astype(np.int32))  # right padding
            assert np.all(ids[mask == 0] == tokenizer.pad_token_id)
            assert np.all(ids[:, 0] == tokenizer.cls_token_id)
        queries = _texts(tokenizer, batch["query_ids"])
        passages = _texts(tokenizer, batch["passage_ids"])
        for i, q in enumerate(queries):
            assert q.startswith("query : q ")
            row = int(q.split()[3])
            seen_long |= row == 0
            if row == 0:  # truncated on the right, still ends with [SEP]
                assert batch["query_mask"][i].all() and batch["query_ids"][i, -1] == tokenizer.sep_token_id
            group = passages[i * 3:(i + 1) * 3]
            assert all(p.startswith("passage : ") for p in group)
            assert re.fullmatch(rf"passage : p {row} [01]", group[0])  # positive first
            negs = group[1:]
            assert len(set(negs)) == 2 and all(re.fullmatch(rf"passage : n {row} [012]", n) for n in negs)
    assert seen_long


def test_negatives_repeated_when_too_few(tokenizer, tmp_path):
    rows = [_row(i, n_neg=1 + i % 2) for i in range(4)]
    data = _make(tokenizer, _write(tmp_path / "t.jsonl", rows), tmp_path, group_size=5)
    (batch,) = _take(data, 1)
    passages, queries = _texts(tokenizer, batch["passage_ids"]), _texts(tokenizer, batch["query_ids"])
    for i, q in enumerate(queries):
        row = int(q.split()[1])
        negs = passages[i * 5 + 1:(i + 1) * 5]
        assert set(negs) <= {f"n {row} {j}" for j in range(1 + row % 2)} and len(negs) == 4
        if row % 2:  # 2 negatives repeated twice, 4 drawn without replacement: each exactly twice
            assert sorted(negs) == sorted([f"n {row} 0", f"n {row} 1"] * 2)


def test_deterministic_for_a_seed(tokenizer, tmp_path):
    path = _write(tmp_path / "t.jsonl", [_row(i) for i in range(12)])
    a = _take(_make(tokenizer, path, tmp_path, seed=3), 6)
    _assert_same(a, _take(_make(tokenizer, path, tmp_path, seed=3), 6))
    b = _take(_make(tokenizer, path, tmp_path, seed=4), 6)
    assert any(not np.array_equal(x["query_ids"], y["query_ids"]) for x, y in zip(a, b))
    # Each epoch is a fresh permutation (3 steps per epoch).
    order = lambda batches: np.concatenate([x["query_ids"] for x in batches])  # noqa: E731
    assert not np.array_equal(order(a[:3]), order(a[3:]))
    assert sorted(map(tuple, order(a[:3]))) == sorted(map(tuple, order(a[3:])))


def test_exact_resume_from_saved_state(tokenizer, tmp_path):
    path = _write(tmp_path / "t.jsonl", [_row(i, n_neg=0 if i % 3 == 0 else 4) for i in range(10)])
    full = _take(_make(tokenizer, path, tmp_path), 7)  # 2 steps per epoch: crosses 3 epoch boundaries
    first = _make(tokenizer, path, tmp_path)
    head = _take(first, 3)
    saved = json.loads(json.dumps(first.state()))
    assert saved["epoch"] == 1 and saved["position"] == 1
    resumed = _make(tokenizer, path, tmp_path)
    resumed.restore(saved)
    _assert_same(full, head + _take(resumed, 4))
    assert resumed.state()["epoch"] == 3 and resumed.state()["position"] == 1


def test_restore_rejects_other_settings(tokenizer, tmp_path):
    path = _write(tmp_path / "t.jsonl", [_row(i) for i in range(8)])
    state = _make(tokenizer, path, tmp_path).state()
    with pytest.raises(DretError, match="global_batch_size"):
        _make(tokenizer, path, tmp_path, global_batch_size=2).restore(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_make_the_global_batch(tokenizer, tmp_path, process_count):
    path = _write(tmp_path / "t.jsonl", [_row(i, n_neg=i % 4) for i in range(20)])
    whole = _take(_make(tokenizer, path, tmp_path, global_batch_size=8), 4)
    parts = [_take(_make(tokenizer, path, tmp_path, global_batch_size=8, process_index=p, process_count=process_count), 4)
             for p in range(process_count)]
    for step, batch in enumerate(whole):
        local = [part[step] for part in parts]
        assert local[0]["query_ids"].shape[0] == 8 // process_count
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([x[key] for x in local]), batch[key])


def test_empty_neg_filled_from_other_rows_positives(tokenizer, tmp_path, caplog):
    rows = [_row(i, n_pos=1, n_neg=0) for i in range(6)]
    del rows[1]["neg"]  # a missing neg is an empty neg
    with caplog.at_level(logging.WARNING, logger="dret.data"):
        data = _make(tokenizer, _write(tmp_path / "t.jsonl", rows), tmp_path, global_batch_size=3, group_size=4)
        batches = _take(data, 4)
    assert sum("empty 'neg'" in r.getMessage() for r in caplog.records) == 1
    for batch in batches:
        passages = _texts(tokenizer, batch["passage_ids"])
        for i, q in enumerate(_texts(tokenizer, batch["query_ids"])):
            row = q.split()[1]
            group = passages[i * 4:(i + 1) * 4]
            assert group[0] == f"p {row} 0"
            assert all(re.fullmatch(r"p \d 0", p) and p != group[0] for p in group[1:])


def test_arrow_cache_reused_without_reparsing(tokenizer, tmp_path, monkeypatch):
    path = _write(tmp_path / "t.jsonl", [_row(i) for i in range(8)])
    first = _make(tokenizer, path, tmp_path)
    assert first.rows.cache_files  # memory-mapped from the Arrow cache, not loaded into RAM
    (arrow,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".arrow")]
    mtime = os.stat(arrow).st_mtime_ns

    def no_reparse(*args):
        raise AssertionError("the file was parsed again")

    monkeypatch.setattr(data_lib, "_build_cache", no_reparse)
    _assert_same(_take(first, 2), _take(_make(tokenizer, path, tmp_path), 2))
    assert os.stat(arrow).st_mtime_ns == mtime
    # A changed file (size/mtime) is parsed again.
    _write(tmp_path / "t.jsonl", [_row(i) for i in range(9)])
    with pytest.raises(AssertionError, match="parsed again"):
        _make(tokenizer, path, tmp_path)


@pytest.mark.parametrize("damage", ["meta.json", "rows.arrow", "meta rows"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tokenizer, tmp_path, caplog, damage):
    """A truncated meta.json, a garbled rows.arrow, or a meta.json that disagrees with the rows: a cache miss."""
    path = _write(tmp_path / "t.jsonl", [_row(i) for i in range(8)])
    want = _take(_make(tokenizer, path, tmp_path), 2)
    (entry,) = (tmp_path / "cache").iterdir()
    if damage == "meta.json":
        (entry / "meta.json").write_text('{"rows": 8, "bad')
    elif damage == "rows.arrow":
        (entry / "rows.arrow").write_bytes(b"not arrow at all" * 4)
    else:
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({**meta, "rows": 5}))
    with caplog.at_level(logging.WARNING, logger="dret"):
        _assert_same(_take(_make(tokenizer, path, tmp_path), 2), want)
    assert "damaged cache entry" in caplog.text and str(entry) in caplog.text
    assert json.loads((entry / "meta.json").read_text())["rows"] == 8  # rebuilt in place


def test_max_example_num_per_dataset(tokenizer, tmp_path):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.jsonl", [_row(i) for i in range(6)])
    _write(tmp_path / "d" / "b.jsonl", [_row(10 + i) for i in range(3)])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    data = _make(tokenizer, str(tmp_path / "d"), tmp_path, max_example_num_per_dataset=4)
    assert len(data) == 7
    rows = {int(q.split()[1]) for b in _take(data, 2 * data.steps_per_epoch) for q in _texts(tokenizer, b["query_ids"])}
    assert {10, 11, 12} <= rows and len(rows - {10, 11, 12}) <= 4


GOOD = json.dumps(_row(0))


@pytest.mark.parametrize("bad_line,what", [
    ('{"query": "a", "pos": [', "not valid JSON"),
    ('{"pos": ["a"]}', "missing 'query'"),
    ('{"query": "a", "neg": ["b"]}', "missing 'pos'"),
    ('{"query": "a", "pos": []}', "'pos' is empty"),
    ('{"query": "a", "pos": "b"}', "'pos' must be a list of strings, got str"),
    ('{"query": "a", "pos": ["b", null]}', "'pos' must be a list of strings, item 1 is NoneType"),
    ('{"query": "a", "pos": ["b"], "neg": ["c", 3]}', "'neg' must be a list of strings, item 1 is int"),
    ('{"query": "a", "pos": ["b"], "neg": "c"}', "'neg' must be a list of strings, got str"),
    ('{"query": 5, "pos": ["b"]}', "'query' must be a string, got int"),
    ('["query", "pos"]', "expected a JSON object, got list"),
])
def test_bad_row_names_file_and_line(tokenizer, tmp_path, bad_line, what):
    path = _write(tmp_path / "bad.jsonl", [GOOD, "", bad_line, GOOD])  # line 2 blank, line 3 bad
    with pytest.raises(DretError) as err:
        _make(tokenizer, path, tmp_path, global_batch_size=1)
    message = str(err.value)
    assert message.startswith(f"{path}:3: {what}") and "\n" not in message
    assert not os.listdir(tmp_path / "cache")  # nothing half-built left behind


def test_invalid_utf8(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"query": "\xff", "pos": ["a"]}\n')
    with pytest.raises(DretError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8 \(byte 0xff at byte 12\)"):
        _make(tokenizer, str(path), tmp_path, global_batch_size=1)


@pytest.mark.parametrize("case,what", [
    ("empty", "no training rows"),
    ("missing", "no such file or directory"),
    ("no_jsonl", "directory has no .jsonl files"),
    ("too_few", "has 2 rows, fewer than global_batch_size 4"),
])
def test_bad_train_data(tokenizer, tmp_path, case, what):
    target = tmp_path / "x.jsonl"
    if case == "empty":
        target.write_text("\n")
    elif case == "no_jsonl":
        target = tmp_path / "dir"
        target.mkdir()
        (target / "a.json").write_text(GOOD)
    elif case == "too_few":
        _write(target, [GOOD, GOOD])
    with pytest.raises(DretError, match=re.escape(what)) as err:
        _make(tokenizer, str(target), tmp_path)
    assert str(target) in str(err.value) and "\n" not in str(err.value)


def test_bad_settings(tokenizer, tmp_path):
    path = _write(tmp_path / "t.jsonl", [_row(i) for i in range(8)])
    with pytest.raises(DretError, match="split evenly"):
        _make(tokenizer, path, tmp_path, process_count=3)


def test_skip_bad_rows_counts(tokenizer, tmp_path, caplog):
    path = _write(tmp_path / "t.jsonl", [GOOD, "{oops", GOOD, '{"query": "a", "pos": []}', GOOD, "[]", GOOD, GOOD])
    with caplog.at_level(logging.WARNING, logger="dret.data"):
        data = _make(tokenizer, path, tmp_path, skip_bad_rows=True)
    assert len(data) == 5
    assert any(f"skipped 3 bad rows of {path} (first: {path}:2: not valid JSON" in r.getMessage() for r in caplog.records)
    # The cached file still remembers its bad rows when skipping is turned off.
    with pytest.raises(DretError, match=rf"^{re.escape(path)}:2: not valid JSON"):
        _make(tokenizer, path, tmp_path)


def test_closing_the_iterator_stops_the_thread(tokenizer, tmp_path):
    data = _make(tokenizer, _write(tmp_path / "t.jsonl", [_row(i) for i in range(40)]), tmp_path, prefetch=2)
    it = data.batches(50)
    next(it), next(it)
    it.close()
    assert data.state()["position"] == 2
    assert not any(t.name == "dret-data" for t in threading.enumerate())


def test_scifact_train(tokenizer, tmp_path, shared_data):
    path = str(shared_data / "train_jsonl" / "scifact_train.jsonl")
    data = _make(tokenizer, path, tmp_path, global_batch_size=8, group_size=4, query_max_len=32, passage_max_len=64)
    assert len(data) == 809 and data.steps_per_epoch == 101
    batch = _take(data, 1)[0]
    assert batch["passage_ids"].shape == (32, 64) and batch["query_ids"].shape == (8, 32)

    def cut(text, max_len):  # what a decoded, truncated sequence reads
        return tokenizer.decode(tokenizer(text, max_length=max_len, truncation=True)["input_ids"], skip_special_tokens=True)

    with open(path) as f:
        rows = {cut(r["query"], 32): r for r in map(json.loads, f)}
    passages = _texts(tokenizer, batch["passage_ids"])
    for i, q in enumerate(_texts(tokenizer, batch["query_ids"])):
        row = rows[q]
        assert passages[i * 4] in {cut(p, 64) for p in row["pos"]}
        assert set(passages[i * 4 + 1:(i + 1) * 4]) <= {cut(n, 64) for n in row["neg"]}


def test_builtin_data_file_is_written_once_and_by_each_process_safely(tmp_path):
    """The built-in training file under output_dir: an identical file is not rewritten (its cache key, the mtime,
    stays), and the processes of a multi-host run, writing it at once, each rename their own temporary file."""
    from dret.demo_data import write_train_jsonl

    path = str(tmp_path / "data" / "train.jsonl")
    first = os.stat(write_train_jsonl(path)).st_mtime_ns
    assert os.stat(write_train_jsonl(path)).st_mtime_ns == first
    script = f"from dret.demo_data import write_train_jsonl\nfor _ in range(20): write_train_jsonl({path!r})"
    os.remove(path)
    writers = [subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": ROOT})
               for _ in range(2)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert sorted(os.listdir(tmp_path / "data")) == ["train.jsonl"]
