"""Read a PyTorch `pytorch_model.bin` (zip format) into numpy without torch.

Pickle can run arbitrary code: callers must have the user's explicit `allow_pickle=True`. Even then this
unpickler resolves only the handful of globals a plain state dict needs and refuses everything else.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, copied out."""
    if not size:
        return storage[offset].copy()
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride))
    return np.ascontiguousarray(view)


def _rebuild_parameter(tensor, *_):
    return tensor


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing pickle global {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        return np.frombuffer(raw, dtype=storage_type.dtype)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """`pytorch_model.bin` -> {name: array}; raises ValueError for anything but a zip-format state dict."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a zip-format torch checkpoint (torch>=1.6 save format)")
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ValueError("no data.pkl inside the archive")
        with archive.open(pkl) as f:
            state = _Unpickler(f, archive, pkl.rsplit("/", 1)[0]).load()
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, found {type(state).__name__}")
    return dict(state)
