"""On-disk embedding cache: one folder per key (model files, data files, options), `emb.npy` + `manifest.json`.

The manifest records the array's shape, dtype and sha256; an entry that does not match it is a miss."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

import numpy as np

from dret.errors import DretError

log = logging.getLogger(__name__)

VERSION = 2  # 2: the manifest holds dtype and sha256
_WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole; bigger ones by size, mtime, head and tail


def default_dir() -> str:
    return os.environ.get("DRET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dret", "embeddings"))


def file_fingerprint(path: str) -> str:
    """sha256 of a file's bytes (head + tail + size + mtime for files past 64 MiB)."""
    h = hashlib.sha256()
    st = os.stat(path)
    with open(path, "rb") as f:
        if st.st_size <= _WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()


def folder_fingerprint(folder: str) -> str:
    """Fingerprint of every file under a folder (model weights, tokenizer, configs)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(f"{os.path.relpath(path, folder)}={file_fingerprint(path)}\n".encode())
    return h.hexdigest()


def key(**parts) -> str:
    """A cache key from JSON-able parts."""
    return hashlib.sha256(json.dumps({"version": VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def _checksum(emb_nd: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(emb_nd).data).hexdigest()


def _read(path: str, read):
    """read(path), any failure raised as a one-line DretError naming the path."""
    try:
        return read(path)
    except OSError as e:
        raise DretError(f"{path}: {e.strerror or e}") from None
    except (ValueError, EOFError) as e:  # json and .npy format errors
        raise DretError(f"{path}: {' '.join(str(e).split())}") from None


def _json_file(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _verified(folder: str, rows: int) -> np.ndarray:
    """The entry's [rows, d] array after checking it against its manifest; DretError says what does not match."""
    manifest_path, path = os.path.join(folder, "manifest.json"), os.path.join(folder, "emb.npy")
    manifest = _read(manifest_path, _json_file)
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise DretError(f"{manifest_path}: expected a version {VERSION} cache manifest")
    emb_nd = _read(path, lambda p: np.array(np.lib.format.open_memmap(p, mode="r")))  # .npy only: no pickle
    for what, key, got in (("shape", "shape", list(emb_nd.shape)), ("dtype", "dtype", str(emb_nd.dtype)),
                           ("checksum", "sha256", _checksum(emb_nd))):
        if manifest.get(key) != got:
            raise DretError(f"{path}: {what} {got} does not match the manifest's {manifest.get(key)}")
    if emb_nd.shape[:1] != (rows,):
        raise DretError(f"{path}: expected {rows} rows, got shape {list(emb_nd.shape)}")
    return emb_nd


def load(cache_dir: str | None, k: str, rows: int) -> np.ndarray | None:
    """The cached [rows, d] array of a key, or None; an entry that is unreadable or does not match its manifest
    (shape, dtype, sha256 of the bytes) is a miss, warned about with its path."""
    if cache_dir is None or not os.path.isdir(os.path.join(cache_dir, k)):
        return None
    try:
        return _verified(os.path.join(cache_dir, k), rows)
    except DretError as e:
        log.warning("embedding cache miss, the entry will be rewritten: %s", e)
        return None


def save(cache_dir: str | None, k: str, emb_nd: np.ndarray, manifest: dict) -> None:
    """Write emb.npy and manifest.json (shape, dtype, sha256), each to a temporary file then os.replace, so an
    interrupted write leaves no half entry (an emb.npy without its new manifest fails the checksum: a miss).
    A cache that cannot be written is warned about; evaluation goes on without it."""
    if cache_dir is None:
        return
    folder = os.path.join(cache_dir, k)
    manifest = {"version": VERSION, "shape": list(emb_nd.shape), "dtype": str(emb_nd.dtype),
                "sha256": _checksum(emb_nd), **manifest}
    writers = {"emb.npy": lambda f: np.save(f, emb_nd, allow_pickle=False),
               "manifest.json": lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())}
    temporary = {}
    try:
        os.makedirs(folder, exist_ok=True)
        for name, write in writers.items():
            fd, temporary[name] = tempfile.mkstemp(dir=folder, prefix=name + ".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                write(f)
        for name, tmp in temporary.items():
            os.replace(tmp, os.path.join(folder, name))
    except OSError as e:
        log.warning("embedding cache entry %s not written: %s", folder, e)
    finally:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
