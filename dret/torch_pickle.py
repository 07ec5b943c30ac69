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


class _TensorRef:
    """A tensor as the pickle declares it: built only after unpickling, when its key is known to name it."""

    def __init__(self, storage: np.ndarray, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def _bounds_error(self) -> str | None:
        """Why this view would read outside its storage (or copy more than it holds), or None."""
        fields = (self.offset, *self.size, *self.stride)
        if not all(isinstance(n, int) and n >= 0 for n in fields) or len(self.size) != len(self.stride):
            return "expected non-negative integer offset, sizes and strides of one length each"
        elements, stored = int(np.prod(self.size, dtype=object)), self.storage.size
        if elements == 0:
            return None if self.offset <= stored else f"starts at element {self.offset}"
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= stored:
            return f"reads up to element {last}"
        return f"holds {elements} elements" if elements > stored else None

    def build(self, key: str) -> np.ndarray:
        """The view, copied out; ValueError naming `key` where it lies outside its storage."""
        problem = self._bounds_error()
        if problem:
            raise ValueError(f"tensor {key!r} (offset {self.offset}, size {self.size}, stride {self.stride}) "
                             f"{problem}, but its storage holds {self.storage.size}")
        item = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(self.storage[self.offset:], shape=self.size,
                                               strides=tuple(s * item for s in self.stride), writeable=False)
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage."""
    return _TensorRef(storage, offset, size, stride)


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
    not_tensors = [k for k, v in state.items() if not isinstance(v, _TensorRef)]
    if not_tensors:
        raise ValueError(f"{not_tensors[0]!r} is not a tensor: expected a state dict of tensors only")
    return {key: ref.build(key) for key, ref in state.items()}
