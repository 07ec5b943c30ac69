"""Built-in demo data made from the Python standard library's own documentation (no download, deterministic).

Each documented public function or method gives a pair: query = its one-line summary, passage = the rest of its
docstring. The texts depend only on the Python version.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os

MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "configparser", "copy", "csv", "datetime",
    "decimal", "difflib", "email.message", "email.utils", "fnmatch", "fractions", "ftplib", "functools", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.cookies", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "locale", "logging", "mailbox", "math", "mimetypes", "operator", "os", "os.path",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets", "shlex", "shutil", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "time", "tokenize", "traceback", "typing", "unicodedata", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
)
MIN_PASSAGE_CHARS = 120


def _documented(module) -> list[tuple[str, object]]:
    """Public functions, classes and their methods defined in `module`, as (qualified name, object)."""
    found = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        found.append((f"{module.__name__}.{name}", obj))
        if inspect.isclass(obj):
            found += [(f"{module.__name__}.{name}.{m}", f) for m, f in sorted(vars(obj).items())
                      if not m.startswith("_") and callable(f)]
    return found


def _pair(doc: str | None) -> tuple[str, str] | None:
    """(summary, rest) of a docstring whose first paragraph is one sentence and whose rest is long enough."""
    if not doc:
        return None
    summary, _, rest = doc.strip().partition("\n\n")
    rest = " ".join(rest.split())
    if "\n" in summary or not summary.endswith(".") or len(rest) < MIN_PASSAGE_CHARS:
        return None
    return summary.strip(), rest


def build_pairs() -> list[dict]:
    """[{"id", "query", "passage"}], one per distinct docstring, in a fixed order."""
    pairs, seen = [], set()
    for module_name in MODULES:
        for qualname, obj in _documented(importlib.import_module(module_name)):
            pair = _pair(inspect.getdoc(obj))
            if pair and pair[1] not in seen and pair[0] not in seen:
                seen.update(pair)
                pairs.append({"id": qualname, "query": pair[0], "passage": pair[1]})
    return pairs


BUILTIN_TRAIN_DATA = "builtin:stdlib-docs"
HELD_OUT_EVERY = 5  # every 5th pair is held out from training, for the demo's before/after evaluation


def split_pairs(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held_out): a fixed interleaved split."""
    return ([p for i, p in enumerate(pairs) if i % HELD_OUT_EVERY],
            [p for i, p in enumerate(pairs) if i % HELD_OUT_EVERY == 0])


def write_train_jsonl(path: str) -> str:
    """The training split as {"query", "pos", "neg": []} rows (negatives come from other rows' positives). A file
    already holding them is left as it is (its data cache stays valid); the processes of a multi-host run may
    write it at once: each writes its own temporary file and renames it into place."""
    train, _ = split_pairs(build_pairs())
    text = "".join(json.dumps({"query": p["query"], "pos": [p["passage"]], "neg": []}) + "\n" for p in train)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
