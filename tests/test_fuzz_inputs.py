"""Seeded fuzzing of what users hand dret: 200 mutations of a training jsonl, a BEIR folder and a model folder's
JSON files, each run through the entry function and error boundary of the command a user would type. Every run
either succeeds or ends with one `dret: ...` line and exit status 2 (no traceback, no other exception), and none
writes outside its output folder."""

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from flax import nnx

from dret.errors import run_command
from dret.eval.__main__ import main as eval_main
from dret.model import Embedder
from dret.train_command import train_command
from tests.train_util import ROOT, tiny_config

UNICODE_EDGES = ["\\ud800", "\\udfff", "\\u0000", "\ufeff", "\u202e", "e\u0301", "\U0001f600", "\u2028", "\x85",
                 "\\u00e9", "x" * 20000, "", " ", "\t\r"]
JSON_SWAPS = [5, -1, 0, 1.5, float("nan"), float("inf"), None, True, "", "text", [], ["a", 1], {}, {"a": "b"},
              [[["deep"]]], 10 ** 30]


def _swap_type(rng: random.Random, text: str) -> str:
    """One JSON value somewhere in `text` (a JSON document or a jsonl line) replaced by a value of another type."""
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    try:
        doc = json.loads(lines[i] if len(lines) > 1 else text)
    except ValueError:
        return text
    node, key = doc, None
    while isinstance(node, (dict, list)) and node:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        if rng.random() < 0.5 or not isinstance(node[key], (dict, list)) or not node[key]:
            break
        node = node[key]
    if key is None:
        doc = rng.choice(JSON_SWAPS)
    elif rng.random() < 0.2 and isinstance(node, dict):
        del node[key]
    else:
        node[key] = rng.choice(JSON_SWAPS)
    if len(lines) == 1:
        return json.dumps(doc)
    lines[i] = json.dumps(doc)
    return "\n".join(lines)


def _unicode_edge(rng: random.Random, text: str) -> str:
    """An edge-case character (as a JSON escape or raw) inserted inside a quoted string."""
    quotes = [i for i, c in enumerate(text) if c == '"']
    at = rng.choice(quotes) + 1 if quotes else 0
    return text[:at] + rng.choice(UNICODE_EDGES) + text[at:]


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """(what was done, mutated bytes)."""
    kind = rng.choice(["truncate", "flip", "insert", "drop line", "swap type", "swap type", "unicode", "unicode",
                       "invalid utf-8", "bom", "crlf", "empty"])
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= rng.randint(1, 255)
        return kind, bytes(out)
    if kind == "insert":
        at = rng.randrange(len(data))
        return kind, data[:at] + bytes(rng.choice(b'{}[]",:\\\n\t0aZ') for _ in range(rng.randint(1, 4))) + data[at:]
    if kind == "invalid utf-8":
        at = rng.randrange(len(data))
        return kind, data[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe9"]) + data[at:]
    if kind == "bom":
        return kind, b"\xef\xbb\xbf" + data
    if kind == "crlf":
        return kind, data.replace(b"\n", b"\r\n")
    if kind == "empty":
        return kind, b""
    text = data.decode()
    if kind == "drop line":
        lines = text.split("\n")
        del lines[rng.randrange(len(lines))]
        return kind, "\n".join(lines).encode()
    if kind == "swap type":
        return kind, _swap_type(rng, text).encode()
    return kind, _unicode_edge(rng, text).encode("utf-8", "surrogatepass")


def _snapshot(*roots) -> dict:
    """path -> (size, mtime) of every file under `roots`, and the names at the top of the project (where a
    relative default such as eval_results/ would land)."""
    seen = {os.path.join(ROOT, name): None for name in os.listdir(ROOT)}
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                seen[path] = (st.st_size, st.st_mtime_ns)
    return seen


def run_entry(entry, *args) -> tuple[int, str]:
    """(exit status, stderr) of `entry(*args)` inside the commands' error boundary, in this process; any other
    exception escapes and fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_command(entry, *args)
            status = 0
        except SystemExit as e:
            status = e.code
    return status, err.getvalue()


def check_outcome(case: str, status: int, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, f"{case}: {stderr[-3000:]}"
    if status:
        assert status == 2 and lines and lines[-1].startswith("dret: "), f"{case}: status {status}: {lines[-3:]}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A valid training jsonl, BEIR folder and tiny model folder (random weights on MiniLM's tokenizer)."""
    from dret.hf_io import read_config
    from dret import models
    from dret.models.bert import TINY
    from dret.resources import bundled_minilm
    import transformers

    root = tmp_path_factory.mktemp("fuzz_inputs")
    rows = [{"query": f"what is item {i}?", "pos": [f"item {i} is a thing"], "neg": [f"item {i + 1} is not"]}
            for i in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": f"t{i}", "text": f"doc {i}"})
                                               + "\n" for i in range(12)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n"
                                                for i in range(4)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t{i % 3}\n"
                                                                                      for i in range(4)))
    hf = {**read_config(bundled_minilm()), **TINY}
    Embedder(models.build(hf, rngs=nnx.Rngs(0)),
             transformers.AutoTokenizer.from_pretrained(bundled_minilm()), hf, pooling="mean").save(str(root / "model"))
    return root


def _mutated_copy(rng, source, dest, files: list[str]) -> str:
    """`source` copied to `dest` with one of `files` (relative paths) mutated or deleted; returns the case name."""
    if os.path.isdir(source):
        shutil.copytree(source, dest)
    else:
        shutil.copy(source, dest)
    name = rng.choice(files)
    path = os.path.join(dest, name) if name else dest
    if rng.random() < 0.05:
        os.remove(path)
        return f"{name} deleted"
    kind, data = mutate(rng, open(path, "rb").read())
    with open(path, "wb") as f:
        f.write(data)
    return f"{name or os.path.basename(dest)}: {kind}"


def _model_json_files(model_dir: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), model_dir) for d, _, fs in os.walk(model_dir)
                  for f in fs if f.endswith(".json") and f != "tokenizer.json")


CASES = {"train jsonl": 80, "beir folder": 70, "model json": 50}


@pytest.mark.parametrize("target", sorted(CASES))
def test_mutated_inputs_succeed_or_fail_in_one_line(target, inputs, tmp_path):
    rng = random.Random(f"dret-fuzz-{target}")
    failures = 0
    for n in range(CASES[target]):
        case_dir = tmp_path / f"case{n}"
        out = case_dir / "out"
        out.mkdir(parents=True)
        if target == "train jsonl":
            case = _mutated_copy(rng, inputs / "train.jsonl", case_dir / "train.jsonl", [""])
            config = tiny_config(case_dir, train_data=str(case_dir / "train.jsonl"), output_dir=str(out / "run"),
                                 data_cache_dir=str(out / "cache"), dry_run=True)
            entry, args = train_command, (config,)
        else:
            if target == "beir folder":
                case = _mutated_copy(rng, inputs / "beir", case_dir / "beir", ["corpus.jsonl", "queries.jsonl",
                                                                               "qrels/test.tsv"])
                model, data = inputs / "model", case_dir / "beir"
            else:
                case = _mutated_copy(rng, inputs / "model", case_dir / "model",
                                     _model_json_files(str(inputs / "model")))
                model, data = case_dir / "model", inputs / "beir"
            entry = eval_main
            args = (["--model", str(model), "--data", str(data), "--output_folder", str(out / "results"),
                     "--cache_dir", str(out / "cache"), "--top_k", "10"],)
        before = _snapshot(inputs, case_dir)
        status, stderr = run_entry(entry, *args)
        check_outcome(f"case {n} ({case})", status, stderr)
        failures += status != 0
        after = _snapshot(inputs, case_dir)
        written = {p for p in after if (p not in before or before[p] != after[p])
                   and not p.startswith(str(out) + os.sep)}
        assert not written, f"case {n} ({case}) wrote outside its output folder: {sorted(written)[:5]}"
        shutil.rmtree(case_dir)
    assert 0 < failures < CASES[target], f"{failures} of {CASES[target]} runs failed: the mutations are too mild " \
                                         "or too harsh to test both outcomes"


SUBPROCESS_CASES = [
    ("train", '{"query": "q", "pos": ["\\ud800"], "neg": ["n"]}\n'),
    ("train", '{"query": "q", "pos": "not a list", "neg": []}\n'),
    ("eval", '{"_id": "d0", "text": 5}\n'),
]


@pytest.mark.parametrize("command, content", SUBPROCESS_CASES)
def test_a_few_cases_as_real_commands(command, content, inputs, tmp_path):
    if command == "train":
        (tmp_path / "train.jsonl").write_text(content * 3)
        argv = ["dret.train", "--config", os.path.join(ROOT, "ml_configs", "quickstart.py"), "--config.tiny=True",
                f"--config.train_data={tmp_path / 'train.jsonl'}", f"--config.output_dir={tmp_path / 'run'}",
                f"--config.data_cache_dir={tmp_path / 'cache'}"]
    else:
        shutil.copytree(inputs / "beir", tmp_path / "beir")
        (tmp_path / "beir" / "corpus.jsonl").write_text(content)
        argv = ["dret.eval", "--model", str(inputs / "model"), "--data", str(tmp_path / "beir"),
                "--output_folder", str(tmp_path / "results")]
    result = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("dret: ")
