"""On-disk embedding cache: one folder per key (model files, data files, options), `emb.npy` + `manifest.json`."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

VERSION = 1
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


def load(cache_dir: str | None, k: str) -> np.ndarray | None:
    """The cached [N, d] array of a key, or None."""
    if cache_dir is None:
        return None
    path = os.path.join(cache_dir, k, "emb.npy")
    return np.load(path) if os.path.isfile(path) else None


def save(cache_dir: str | None, k: str, emb_nd: np.ndarray, manifest: dict) -> None:
    """Write emb.npy and manifest.json atomically (a reader sees both or neither)."""
    if cache_dir is None:
        return
    folder = os.path.join(cache_dir, k)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"emb.{os.getpid()}.tmp.npy")
    np.save(tmp, emb_nd)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"version": VERSION, "shape": list(emb_nd.shape), **manifest}, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "emb.npy"))
