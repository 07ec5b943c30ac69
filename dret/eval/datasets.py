"""Retrieval data sets from files: BEIR folders, T2Ranking and MS MARCO-Title tsv files -> `Retrieval`.

Passages are `title + " " + text` (stripped), like BEIR and mteb. Only queries named in the split's qrels
are kept. A qrels line naming an unknown query or passage is skipped, counted and warned about once;
duplicate ids, empty queries and missing files are errors; empty passages are warned about and kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

from dret.errors import DretError


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


def _need(path: str, layout: str) -> str:
    if not os.path.isfile(path):
        raise DretError(f"{path} not found ({layout})")
    return path


def _passage(title: str | None, text: str | None) -> str:
    return ((title or "") + " " + (text or "")).strip()


def _add(ids: list, texts: list, seen: set, id_: str, text: str, where: str) -> None:
    if id_ in seen:
        raise DretError(f"{where}: duplicate id {id_!r}")
    seen.add(id_)
    ids.append(id_)
    texts.append(text)


def _read_jsonl(path: str, *, with_title: bool) -> tuple[list[str], list[str]]:
    ids, texts, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                id_ = str(row["_id"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DretError(f"{path} line {n}: expected a JSON object with \"_id\" ({e})") from None
            text = _passage(row.get("title"), row.get("text")) if with_title else (row.get("text") or "").strip()
            _add(ids, texts, seen, id_, text, f"{path} line {n}")
    return ids, texts


def _read_tsv(path: str, n_cols: int) -> list[list[str]]:
    """Rows of a tab-separated file with at least n_cols fields; a header line (non-numeric `*id` first field) is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip() or (n == 1 and fields[0].lower().lstrip("_") in ("id", "qid", "pid", "query-id")):
                continue
            if len(fields) < n_cols:
                raise DretError(f"{path} line {n}: expected {n_cols} tab-separated fields, got {len(fields)}")
            rows.append(fields)
    return rows


def _read_qrels(path: str) -> list[tuple[str, str, int]]:
    """(qid, doc id, grade) from `qid doc [grade]` (BEIR, T2Ranking) or `qid 0 doc grade` (TREC) lines."""
    out = []
    for fields in _read_tsv(path, 2):
        if len(fields) == 2:
            fields = fields + ["1"]
        qid, did, grade = (fields[0], fields[2], fields[3]) if len(fields) >= 4 else fields[:3]
        try:
            out.append((qid, did, int(float(grade))))
        except ValueError:
            raise DretError(f"{path}: grade {grade!r} of query {qid!r} is not a number") from None
    return out


def _assemble(name, corpus_ids, corpus_texts, query_ids, query_texts, qrel_rows, files) -> Retrieval:
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
    return Retrieval(name, corpus_ids, corpus_texts, query_ids, query_texts, qrels, files, skipped)


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
    name = os.path.basename(os.path.normpath(folder))
    return _assemble(name, corpus_ids, corpus_texts, query_ids, query_texts, _read_qrels(qrels),
                     [corpus, queries, qrels])


def _tsv_texts(path: str, where: str) -> tuple[list[str], list[str]]:
    ids, texts, seen = [], [], set()
    for fields in _read_tsv(path, 2):
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
    corpus_ids, corpus_texts = _tsv_texts(corpus, corpus)
    query_ids, query_texts = _tsv_texts(queries, queries)
    return _assemble("t2ranking", corpus_ids, corpus_texts, query_ids, query_texts, _read_qrels(qrels),
                     [corpus, queries, qrels])


def load_msmarco_title(folder: str, split: str = "dev") -> Retrieval:
    """MS MARCO with titles: corpus.tsv (pid, title, text), queries.<split>.tsv (qid, text), qrels.<split>.tsv (TREC)."""
    layout = f"expected MS MARCO-Title files: corpus.tsv (pid, title, text), queries.{split}.tsv, qrels.{split}.tsv"
    if not os.path.isdir(folder):
        raise DretError(f"data folder {folder} does not exist")
    corpus = _first(folder, ["corpus.tsv"], layout)
    queries = _first(folder, [f"queries.{split}.tsv"], layout)
    qrels = _first(folder, [f"qrels.{split}.tsv"], layout)
    corpus_ids, corpus_texts = _tsv_texts(corpus, corpus)
    query_ids, query_texts = _tsv_texts(queries, queries)
    return _assemble("msmarco_title", corpus_ids, corpus_texts, query_ids, query_texts, _read_qrels(qrels),
                     [corpus, queries, qrels])
