"""Retrieval data sets from files: BEIR folders, T2Ranking and MS MARCO-Title tsv files -> `Retrieval`.

Passages are `title + " " + text` (stripped), like BEIR and mteb. Only queries named in the split's qrels
are kept. A qrels line naming an unknown query or passage is skipped, counted and warned about once;
duplicate ids, empty queries and missing files are errors; empty passages are warned about and kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings

from dret.errors import DretError

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass
class Retrieval:
    """One evaluation set: corpus, queries, graded qrels, and the files it came from (for cache keys)."""
    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    files: list[str]
    skipped_qrels: int = 0
    folder: str = ""  # absolute path of the folder it was read from


def _need(path: str, layout: str) -> str:
    if not os.path.isfile(path):
        raise DretError(f"{path} not found ({layout})")
    return path


def _lines(path: str):
    """(line number, text without its line break) of each non-blank line of a UTF-8 file (a BOM is dropped)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DretError(f"{path}:{n}: expected UTF-8 text, got byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}") from None
            if line.strip():
                yield n, line


def _describe(value) -> str:
    """A JSON value for a message: its type and a short repr."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _json_object(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise DretError(f"{where}: expected a JSON object, got invalid JSON ({e})") from None
    if not isinstance(row, dict):
        raise DretError(f"{where}: expected a JSON object, got {_describe(row)}")
    return row


def _id(row: dict, where: str) -> str:
    if "_id" not in row:
        raise DretError(f"{where}: expected an \"_id\" key, got keys {_describe(sorted(row))}")
    id_ = row["_id"]
    if isinstance(id_, bool) or not isinstance(id_, (str, int)):
        raise DretError(f"{where}: expected \"_id\" to be a string or an integer, got {_describe(id_)}")
    return str(id_)


def _text(row: dict, key: str, where: str) -> str:
    """row[key] as a string ("" when absent or null)."""
    text = row.get(key)
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DretError(f"{where}: expected \"{key}\" to be a string or null, got {_describe(text)}")
    surrogate = _SURROGATE.search(text)
    if surrogate:
        raise DretError(f"{where}: expected \"{key}\" to be valid Unicode, got a lone surrogate "
                        f"U+{ord(surrogate.group()):04X}")
    return text


def _passage(title: str, text: str) -> str:
    return (title + " " + text).strip()


def _add(ids: list, texts: list, seen: set, id_: str, text: str, where: str) -> None:
    if id_ in seen:
        raise DretError(f"{where}: duplicate id {id_!r}")
    seen.add(id_)
    ids.append(id_)
    texts.append(text)


def _read_jsonl(path: str, *, with_title: bool) -> tuple[list[str], list[str]]:
    ids, texts, seen = [], [], set()
    for n, line in _lines(path):
        where = f"{path}:{n}"
        row = _json_object(line, where)
        text = _passage(_text(row, "title", where) if with_title else "", _text(row, "text", where))
        _add(ids, texts, seen, _id(row, where), text, where)
    return ids, texts


def _read_tsv(path: str, n_cols: int) -> list[tuple[str, list[str]]]:
    """(`path:line`, fields) of each row of a tab-separated file with at least n_cols fields; a header line
    (non-numeric `*id` first field) is skipped."""
    rows = []
    for n, line in _lines(path):
        fields = line.split("\t")
        if n == 1 and fields[0].lower().lstrip("_") in ("id", "qid", "pid", "query-id"):
            continue
        if len(fields) < n_cols:
            raise DretError(f"{path}:{n}: expected {n_cols} tab-separated fields, got {len(fields)}")
        rows.append((f"{path}:{n}", fields))
    return rows


def _grade(text: str, where: str) -> int:
    try:
        grade = float(text)
    except ValueError:
        grade = math.nan
    if not grade.is_integer():
        raise DretError(f"{where}: expected an integer grade, got {text!r}")
    return int(grade)


def _read_qrels(path: str) -> list[tuple[str, str, int]]:
    """(qid, doc id, grade) from `qid doc [grade]` (BEIR, T2Ranking) or `qid 0 doc grade` (TREC) lines."""
    out = []
    for where, fields in _read_tsv(path, 2):
        if len(fields) == 2:
            fields = fields + ["1"]
        qid, did, grade = (fields[0], fields[2], fields[3]) if len(fields) >= 4 else fields[:3]
        out.append((qid, did, _grade(grade, where)))
    return out


def _assemble(name, folder, corpus_ids, corpus_texts, query_ids, query_texts, qrel_rows, files) -> Retrieval:
    """Keep the queries named in qrels; skip and count qrels lines naming unknown ids; check texts."""
    known_docs, known_queries = set(corpus_ids), set(query_ids)
    qrels, skipped = {}, 0
    for qid, did, grade in qrel_rows:
        if qid not in known_queries or did not in known_docs:
            skipped += 1
            continue
        qrels.setdefault(qid, {})[did] = grade
    if skipped:
        warnings.warn(f"{name}: skipped {skipped} qrels lines naming an unknown query or passage", stacklevel=3)
    if not qrels:
        raise DretError(f"{name}: no qrels line names a known query and passage ({files[-1]})")
    keep = [i for i, qid in enumerate(query_ids) if qid in qrels]
    query_ids, query_texts = [query_ids[i] for i in keep], [query_texts[i] for i in keep]
    empty = [qid for qid, text in zip(query_ids, query_texts) if not text]
    if empty:
        raise DretError(f"{name}: {len(empty)} queries have empty text (first: {empty[0]!r})")
    n_empty = sum(not t for t in corpus_texts)
    if n_empty:
        warnings.warn(f"{name}: {n_empty} passages have empty text", stacklevel=3)
    return Retrieval(name, corpus_ids, corpus_texts, query_ids, query_texts, qrels, files, skipped,
                     os.path.abspath(folder))


def load_beir(folder: str, split: str = "test") -> Retrieval:
    """BEIR layout: corpus.jsonl {_id, title, text}, queries.jsonl {_id, text}, qrels/<split>.tsv."""
    layout = "expected BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv"
    if not os.path.isdir(folder):
        raise DretError(f"data folder {folder} does not exist")
    corpus, queries = _need(os.path.join(folder, "corpus.jsonl"), layout), _need(os.path.join(folder, "queries.jsonl"), layout)
    qrels = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels):
        splits = sorted(f[:-4] for f in os.listdir(os.path.join(folder, "qrels"))) if os.path.isdir(
            os.path.join(folder, "qrels")) else []
        raise DretError(f"{qrels} not found (splits here: {', '.join(splits) or 'none'})")
    corpus_ids, corpus_texts = _read_jsonl(corpus, with_title=True)
    query_ids, query_texts = _read_jsonl(queries, with_title=False)
    name = os.path.basename(os.path.abspath(folder))  # `.` is named after the current folder
    return _assemble(name, folder, corpus_ids, corpus_texts, query_ids, query_texts, _read_qrels(qrels),
                     [corpus, queries, qrels])


def _tsv_texts(path: str) -> tuple[list[str], list[str]]:
    ids, texts, seen = [], [], set()
    for where, fields in _read_tsv(path, 2):
        _add(ids, texts, seen, fields[0], _passage(*fields[1:3]) if len(fields) > 2 else fields[1].strip(), where)
    return ids, texts


def _first(folder: str, names: list[str], layout: str) -> str:
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise DretError(f"{os.path.join(folder, names[0])} not found ({layout})")


def load_t2ranking(folder: str, split: str = "dev") -> Retrieval:
    """T2Ranking: collection.tsv (pid, text), queries.<split>.tsv (qid, text), qrels.retrieval.<split>.tsv (qid, pid).

    The whole collection is used (the reference cut it to 10k passages).
    """
    layout = f"expected T2Ranking files: collection.tsv, queries.{split}.tsv, qrels.retrieval.{split}.tsv"
    if not os.path.isdir(folder):
        raise DretError(f"data folder {folder} does not exist")
    corpus = _first(folder, ["collection.tsv"], layout)
    queries = _first(folder, [f"queries.{split}.tsv"], layout)
    qrels = _first(folder, [f"qrels.retrieval.{split}.tsv", f"qrels.{split}.tsv"], layout)
    corpus_ids, corpus_texts = _tsv_texts(corpus)
    query_ids, query_texts = _tsv_texts(queries)
    return _assemble("t2ranking", folder, corpus_ids, corpus_texts, query_ids, query_texts, _read_qrels(qrels),
                     [corpus, queries, qrels])


def load_msmarco_title(folder: str, split: str = "dev") -> Retrieval:
    """MS MARCO with titles: corpus.tsv (pid, title, text), queries.<split>.tsv (qid, text), qrels.<split>.tsv (TREC)."""
    layout = f"expected MS MARCO-Title files: corpus.tsv (pid, title, text), queries.{split}.tsv, qrels.{split}.tsv"
    if not os.path.isdir(folder):
        raise DretError(f"data folder {folder} does not exist")
    corpus = _first(folder, ["corpus.tsv"], layout)
    queries = _first(folder, [f"queries.{split}.tsv"], layout)
    qrels = _first(folder, [f"qrels.{split}.tsv"], layout)
    corpus_ids, corpus_texts = _tsv_texts(corpus)
    query_ids, query_texts = _tsv_texts(queries)
    return _assemble("msmarco_title", folder, corpus_ids, corpus_texts, query_ids, query_texts, _read_qrels(qrels),
                     [corpus, queries, qrels])
