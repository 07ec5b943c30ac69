"""Training data: jsonl files -> Arrow cache -> sampled groups -> fixed-shape token batches; per-host, resumable.

    data = TrainData("train.jsonl", tokenizer, global_batch_size=32, group_size=4,
                     query_max_len=32, passage_max_len=512, process_index=p, process_count=P)
    data.restore(saved_state)                        # optional: resume
    for batch in data.batches(data.total_steps(num_epochs, max_steps) - start_step):
        ...; save(data.state())                      # the position after the batch just consumed

Rows are `{"query": str, "pos": [str], "neg": [str]}` (extra keys ignored, a missing `neg` is empty).
`train_data` is one file or a directory of `*.jsonl` files, each a dataset cut (at random, by seed)
to `max_example_num_per_dataset` rows.

Each file is read once, line by line, validated and written to a memory-mapped Arrow file by the
`datasets` library under `cache_dir/<name>-<hash of path, size, mtime>/`: a later run maps it without
parsing, and no file is ever held in RAM. A bad row stops the run with `file:line: what was wrong`,
or with `skip_bad_rows=True` is skipped and counted in the log.

A group is 1 positive (a random one of `pos`) + group_size-1 negatives (without replacement when
`neg` has enough, else drawn from `neg` repeated, as the reference does); a row with an empty `neg`
takes other rows' positives instead. Texts become token ids in `prompt_format` (`dret.prompts`: plain, where
instructions are prefixes, bge_icl or llara), truncated on the right (a text is first cut so that instruction +
text is at most a character bound, see MAX_CHARS_PER_TOKEN) and padded to query_max_len / passage_max_len on
`padding_side` (right by default; the model and pooling read either). bge_icl gives each query k in-context
examples, k uniform in `examples_per_query` (inclusive), each another row of the same file (never the row itself):
(query instruction, its query, a random one of its positives).

Batches are numpy dicts: query_ids/query_mask [b, Lq] and passage_ids/passage_mask [b*G, Lp] int32,
query_pool_from [b] and passage_pool_from [b*G] int32 (each text's leading tokens left out of pooling: the
instruction's `dret.prompts.instruction_length` with `pool_instruction=False`, as NV-Embed, else 0),
query i's group at passage rows i*G..i*G+G-1 (positive first), where b = global_batch_size /
process_count: process p gets rows [p*b, (p+1)*b) of each global batch. Epoch e's order is a
permutation drawn from (seed, e), and each example's sampling (its group and bge_icl examples) from (seed, e,
its position in the epoch), so a batch depends only on (seed, epoch, step): `state()` / `restore()` carry that
position and a resumed iterator yields exactly the batches an uninterrupted one would, on any process count. The
last partial batch of an epoch is dropped. Tokenisation runs on a background thread that keeps a
bounded queue of ready batches.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import queue
import shutil
import threading
from typing import Iterator

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter

from dret import prompts
from dret.errors import DretError
from dret.tokens import PADDING_SIDES, check_instruction

log = logging.getLogger(__name__)

FEATURES = datasets.Features({
    "query": datasets.Value("string"),
    "pos": datasets.List(datasets.Value("string")),
    "neg": datasets.List(datasets.Value("string")),
})
CACHE_VERSION = 2  # bump when the cached layout or validation rules change
SKIP_HINT = " (set skip_bad_rows=True to skip bad rows)"
# Instruction + text is cut to max_len * MAX_CHARS_PER_TOKEN characters before tokenising: a fast tokenizer
# encodes the whole text and only then truncates, so a 50 MB row would cost gigabytes. A token spans about 4 characters
# of English, 1-2 of CJK; the cut changes the ids only for text whose first max_len tokens span more than
# 64 characters each on average (long runs of whitespace or of one unbroken word).
MAX_CHARS_PER_TOKEN = 64


def jsonl_files(train_data: str) -> list[str]:
    """train_data (a file, or a directory of *.jsonl files) -> sorted paths, each a readable regular file."""
    files = [train_data]
    if os.path.isdir(train_data):
        files = sorted(os.path.join(train_data, f) for f in os.listdir(train_data) if f.endswith(".jsonl"))
        if not files:
            raise DretError(f"train_data {train_data}: directory has no .jsonl files")
    for path in files:
        _require_readable_file(path)
    return files


def _require_readable_file(path: str) -> None:
    if not os.path.exists(path):
        raise DretError(f"train_data {path}: no such file or directory")
    if not os.path.isfile(path):
        raise DretError(f"train_data {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DretError(f"train_data {path}: permission denied")


def _string_list_problem(row: dict, key: str) -> str | None:
    value = row[key]
    if not isinstance(value, list):
        return f"'{key}' must be a list of strings, got {type(value).__name__}"
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return f"'{key}' must be a list of strings, item {i} is {type(item).__name__}"
    return None


def _lone_surrogate_problem(row: dict) -> str | None:
    """A string that UTF-8 cannot encode: a lone surrogate, which only a JSON escape ("\\ud800") can make."""
    texts = [("'query'", row["query"])]
    texts += [(f"'{key}' item {i}", text) for key in ("pos", "neg") for i, text in enumerate(row[key])]
    for where, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{where} has a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start})"
    return None


def parse_row(line: bytes) -> tuple[dict | None, str | None]:
    """One jsonl line -> (row with query/pos/neg, None) or (None, what is wrong)."""
    try:
        text = line.decode("utf-8").removeprefix("\ufeff")  # a byte order mark starts some files: skip it
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1})"
    try:
        row = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays or objects nested too deeply
        return None, f"not valid JSON ({str(e).splitlines()[0]})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    for key in ("query", "pos"):
        if key not in row:
            return None, f"missing '{key}'"
    if not isinstance(row["query"], str):
        return None, f"'query' must be a string, got {type(row['query']).__name__}"
    row.setdefault("neg", [])
    for key in ("pos", "neg"):
        problem = _string_list_problem(row, key)
        if problem:
            return None, problem
    if not row["pos"]:
        return None, "'pos' is empty: each row needs at least one positive"
    problem = _lone_surrogate_problem(row)
    if problem:
        return None, problem
    return {"query": row["query"], "pos": row["pos"], "neg": row["neg"]}, None


def _build_cache(path: str, out_dir: str, skip_bad_rows: bool) -> None:
    """Stream `path` once: validate each line and write good rows to out_dir/rows.arrow + meta.json."""
    tmp_dir = f"{out_dir}.tmp{os.getpid()}-{threading.get_ident()}"
    os.makedirs(tmp_dir, exist_ok=True)
    try:
        writer = ArrowWriter(features=FEATURES, path=os.path.join(tmp_dir, "rows.arrow"), writer_batch_size=256)
        meta = {"rows": 0, "bad_rows": 0, "first_bad": None, "empty_neg_rows": 0}
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row, problem = parse_row(line)
                if problem:
                    message = f"{path}:{line_no}: {problem}"
                    if not skip_bad_rows:
                        raise DretError(message + SKIP_HINT)
                    meta["bad_rows"] += 1
                    meta["first_bad"] = meta["first_bad"] or message
                    continue
                writer.write(row)
                meta["rows"] += 1
                meta["empty_neg_rows"] += not row["neg"]
        writer.finalize()
        with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:  # another process finished the same cache first
            pass
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_rows(path: str, cache_dir: str, skip_bad_rows: bool) -> tuple[datasets.Dataset, dict]:
    """One jsonl file -> (memory-mapped Arrow rows, meta), building the cache on first use."""
    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}".encode())
    out_dir = os.path.join(cache_dir, f"{os.path.basename(path)}-{key.hexdigest()[:16]}")
    cached = _read_cache(out_dir) if os.path.isdir(out_dir) else None
    if cached is None:
        log.info("validating %s and caching it as Arrow in %s", path, out_dir)
        _build_cache(path, out_dir, skip_bad_rows)
        cached = _read_cache(out_dir)
    rows, meta = cached
    if meta["bad_rows"]:
        if not skip_bad_rows:
            raise DretError(meta["first_bad"] + SKIP_HINT)
        log.warning("skipped %d bad rows of %s (first: %s)", meta["bad_rows"], path, meta["first_bad"])
    if not meta["rows"]:
        skipped = f" ({meta['bad_rows']} bad rows skipped)" if meta["bad_rows"] else ""
        raise DretError(f"{path}: no training rows{skipped}")
    return rows, meta


def _read_cache(out_dir: str) -> tuple[datasets.Dataset, dict] | None:
    """A cache entry's rows and meta; None, with a warning and the entry removed, when it cannot be read whole (a
    damaged file is a miss, rebuilt from the jsonl, never a traceback)."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
        rows = datasets.Dataset.from_file(os.path.join(out_dir, "rows.arrow"))
        if len(rows) != meta["rows"] or not isinstance(meta["bad_rows"], int):
            raise ValueError(f"{len(rows)} rows where meta.json says {meta['rows']}")
        return rows, meta
    except (OSError, ValueError, KeyError, TypeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        log.warning("%s: damaged cache entry (%s): rebuilding it", out_dir, str(e).splitlines()[0] if str(e) else e)
        shutil.rmtree(out_dir, ignore_errors=True)
        return None


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            pass


class TrainData:
    """Sampled, tokenised, per-process training batches with a resumable position."""

    def __init__(
        self,
        train_data: str,
        tokenizer,
        *,
        global_batch_size: int,
        group_size: int,
        query_max_len: int,
        passage_max_len: int,
        query_instruction: str = "",
        passage_instruction: str = "",
        padding_side: str = "right",
        prompt_format: str = "",
        pool_instruction: bool = True,
        examples_per_query: tuple[int, int] = (0, 5),
        max_example_num_per_dataset: int = 100_000_000,
        seed: int = 42,
        skip_bad_rows: bool = False,
        cache_dir: str | None = None,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 4,
    ):
        if group_size < 1 or global_batch_size < 1 or max_example_num_per_dataset < 1:
            raise DretError("group_size, global_batch_size and max_example_num_per_dataset must be at least 1")
        if global_batch_size % process_count or not 0 <= process_index < process_count:
            raise DretError(f"global_batch_size {global_batch_size} must split evenly over {process_count} processes")
        if tokenizer.pad_token is None:
            raise DretError("the tokenizer has no pad token: set one (e.g. its eos or unk token)")
        if padding_side not in PADDING_SIDES:
            raise DretError(f"padding_side={padding_side!r}: expected one of {', '.join(PADDING_SIDES)}")
        check_instruction(tokenizer, query_instruction, query_max_len, "query_instruction_for_retrieval")
        check_instruction(tokenizer, passage_instruction, passage_max_len, "passage_instruction_for_retrieval")
        if not 0 <= examples_per_query[0] <= examples_per_query[1]:
            raise DretError(f"examples_per_query={examples_per_query}: expected (low, high) with 0 <= low <= high")
        self.prompt_format, self.examples_per_query = prompt_format or "plain", examples_per_query
        for role, instruction, max_len in (("query", query_instruction, query_max_len),
                                           ("passage", passage_instruction, passage_max_len)):
            # bad settings (format, an instruction with llara, a max length too short) fail here, not on the loader
            prompts.encode(self.prompt_format, tokenizer, [""], role=role, max_length=max_len, instruction=instruction)
        self.query_pool_from, self.passage_pool_from = (0, 0) if pool_instruction else (
            prompts.instruction_length(tokenizer, query_instruction),
            prompts.instruction_length(tokenizer, passage_instruction))
        self.global_batch_size, self.group_size, self.seed = global_batch_size, group_size, seed
        self.query_max_len, self.passage_max_len = query_max_len, passage_max_len
        self.query_instruction, self.passage_instruction = query_instruction, passage_instruction
        self.process_index, self.process_count, self.prefetch = process_index, process_count, prefetch
        self._tokenizer = copy.deepcopy(tokenizer)  # our own: its padding/truncation state is set per call
        self._tokenizer.padding_side, self._tokenizer.truncation_side = padding_side, "right"

        cache_dir = cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "dret_train")
        parts, row_ids, offset, empty_neg, file_starts = [], [], 0, 0, []
        self.files = {}  # path -> rows kept
        for k, path in enumerate(jsonl_files(train_data)):
            rows, meta = load_rows(path, cache_dir, skip_bad_rows)
            ids = np.arange(len(rows))
            if len(rows) > max_example_num_per_dataset:
                cut_rng = np.random.default_rng([seed, 0, k])
                ids = np.sort(cut_rng.choice(len(rows), max_example_num_per_dataset, replace=False))
            parts.append(rows)
            file_starts.append(sum(self.files.values()))  # this file's first position in _row_ids
            self.files[path] = len(ids)
            row_ids.append(ids + offset)
            offset += len(rows)
            empty_neg += meta["empty_neg_rows"]
        self.rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]  # memory-mapped Arrow
        self._row_ids = np.concatenate(row_ids)  # [rows] indices into self.rows
        self._file_starts = np.array(file_starts + [len(self._row_ids)])  # [files + 1] each file's rows in _row_ids
        self.steps_per_epoch = len(self) // global_batch_size
        if not self.steps_per_epoch:
            raise DretError(
                f"train_data {train_data} has {len(self)} rows, fewer than global_batch_size {global_batch_size}")
        if empty_neg and group_size > 1:
            if len(self) < 2:
                raise DretError(f"train_data {train_data}: its one row has no 'neg' and no other row to lend negatives")
            log.warning("%d rows have an empty 'neg': their negatives are other rows' positives", empty_neg)
        self._epoch, self._position = 0, 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._row_ids)

    def total_steps(self, num_epochs: int, max_steps: int = -1) -> int:
        """max_steps when positive (it overrides num_epochs, as in the reference), else num_epochs epochs."""
        return max_steps if max_steps > 0 else num_epochs * self.steps_per_epoch

    def state(self) -> dict:
        """JSON-serialisable position after the last batch handed out."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed, "rows": len(self),
                "global_batch_size": self.global_batch_size, "group_size": self.group_size, "files": self.files}

    def restore(self, state: dict) -> None:
        """Continue from a position saved by `state()` on the same data and settings."""
        for key in ("seed", "rows", "global_batch_size", "group_size"):
            if state[key] != self.state()[key]:
                raise DretError(f"cannot resume the data position: saved {key} {state[key]}, now {self.state()[key]}")
        self._epoch, self._position = state["epoch"], state["position"]

    def batches(self, num_steps: int) -> Iterator[dict[str, np.ndarray]]:
        """The next num_steps batches (prepared on a background thread); state() follows each one."""
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        start = (self._epoch, self._position)

        def produce():
            epoch, step = start
            try:
                for _ in range(num_steps):
                    if stop.is_set():
                        return
                    batch = self.batch(epoch, step)
                    epoch, step = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
                    _put(ready, (batch, epoch, step), stop)
            except BaseException as e:  # re-raised on the consuming thread
                _put(ready, e, stop)

        thread = threading.Thread(target=produce, name="dret-data", daemon=True)
        thread.start()
        try:
            for _ in range(num_steps):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                batch, self._epoch, self._position = item
                yield batch
        finally:
            stop.set()
            thread.join()

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step` of `epoch`."""
        local = self.global_batch_size // self.process_count
        first = step * self.global_batch_size + self.process_index * local
        positions = range(first, first + local)
        ids = self._row_ids[self._permutation(epoch)[first:first + local]]
        rows = self.rows[ids.tolist()]
        queries, passages, examples = [], [], []
        for k, position in enumerate(positions):
            rng = np.random.default_rng([self.seed, 2, epoch, position])
            queries.append(rows["query"][k])
            passages.extend(self._group(rng, rows["pos"][k], rows["neg"][k], ids[k]))
            if self.prompt_format == "bge_icl":  # drawn after the group: the other formats' draws stay as they were
                examples.append(self._examples(rng, self._permutation(epoch)[position]))
        query_ids, query_mask = self._tokenize(queries, "query", self.query_max_len, self.query_instruction,
                                               examples or None)
        passage_ids, passage_mask = self._tokenize(passages, "passage", self.passage_max_len,
                                                   self.passage_instruction)
        return {"query_ids": query_ids, "query_mask": query_mask,
                "passage_ids": passage_ids, "passage_mask": passage_mask,
                "query_pool_from": np.full(len(queries), self.query_pool_from, np.int32),
                "passage_pool_from": np.full(len(passages), self.passage_pool_from, np.int32)}

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, 1, epoch]).permutation(len(self)))
        return self._perm_cache[1]

    def _group(self, rng: np.random.Generator, pos: list[str], neg: list[str], row_id: int) -> list[str]:
        """[positive] + group_size-1 negatives."""
        n_neg = self.group_size - 1
        group = [pos[rng.integers(len(pos))]]
        if n_neg and neg:
            pool = neg if len(neg) >= n_neg else neg * math.ceil(n_neg / len(neg))
            group += [pool[j] for j in rng.choice(len(pool), n_neg, replace=False)]
        elif n_neg:  # other rows' positives
            j = rng.integers(len(self) - 1, size=n_neg)  # positions in _row_ids (sorted), skipping row_id's
            j += j >= np.searchsorted(self._row_ids, row_id)
            for other_pos in self.rows[self._row_ids[j].tolist()]["pos"]:
                group.append(other_pos[rng.integers(len(other_pos))])
        return group

    def _examples(self, rng: np.random.Generator, index: int) -> list[str]:
        """bge_icl in-context examples for the row at `index` of _row_ids: other rows of its file."""
        f = np.searchsorted(self._file_starts, index, side="right") - 1
        start, n = self._file_starts[f], self._file_starts[f + 1] - self._file_starts[f]
        k = min(int(rng.integers(self.examples_per_query[0], self.examples_per_query[1] + 1)), n - 1)
        j = rng.choice(n - 1, k, replace=False)
        j += j >= index - start  # skip the row itself
        others = self.rows[self._row_ids[start + j].tolist()]
        return [prompts.format_example(self.query_instruction, query, pos[rng.integers(len(pos))])
                for query, pos in zip(others["query"], others["pos"])]

    def _tokenize(self, texts: list[str], role: str, max_len: int, instruction: str,
                  examples: list[list[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> ids and mask [n, max_len] int32, padded on padding_side."""
        bound = max(max_len * MAX_CHARS_PER_TOKEN - len(instruction), 0)
        ids = prompts.encode(self.prompt_format, self._tokenizer, [text[:bound] for text in texts], role=role,
                             max_length=max_len, instruction=instruction, examples=examples)
        ids_nl = np.full((len(ids), max_len), self._tokenizer.pad_token_id, np.int32)
        mask_nl = np.zeros((len(ids), max_len), np.int32)
        for i, row in enumerate(ids):
            cols = slice(0, len(row)) if self._tokenizer.padding_side == "right" else slice(max_len - len(row), None)
            ids_nl[i, cols], mask_nl[i, cols] = row, 1
        return ids_nl, mask_nl
