"""Read a PaddlePaddle `.pdparams` state dict (what `paddle.save(model.state_dict(), ...)` writes) into numpy without
paddle.

The file is a pickle (protocol 2 to 4) of a dict name -> numpy array, plus paddle's bookkeeping entries
(`StructuredToParameterName@@`, and `UnpackBigParamInfor@@` where protocol 2 or 3 split a tensor over 1 GiB into
slices); tensors saved outside a state dict are `(name, array)` tuples. Pickle can run arbitrary code: callers must
have the user's explicit `allow_pickle=True`. Even then this unpickler builds arrays itself, from the handful of globals
that numpy's own array pickles name, and refuses everything else.
"""

from __future__ import annotations

import collections
import pickle

import ml_dtypes
import numpy as np

_NAME_TABLE, _SPLIT_INFO = "StructuredToParameterName@@", "UnpackBigParamInfor@@"
# numpy dtype codes a state dict may hold; paddle stores bfloat16 as uint16 (numpy has no bfloat16)
_DTYPES = {"f2": np.float16, "f4": np.float32, "f8": np.float64, "i1": np.int8, "i2": np.int16, "i4": np.int32,
           "i8": np.int64, "u1": np.uint8, "u2": ml_dtypes.bfloat16, "b1": np.bool_}


class _NdarrayClass:
    """Stands for `numpy.ndarray` in `_reconstruct(numpy.ndarray, (0,), b'b')`."""


class _DType:
    """`numpy.dtype(code, align, copy)`, then its state (byte order at index 1) set by the pickle's BUILD."""

    def __init__(self, code, _align=False, _copy=True):
        if code not in _DTYPES:
            raise pickle.UnpicklingError(f"refusing array dtype {code!r}: expected one of {', '.join(_DTYPES)}")
        self.code, self.byteorder = code, "|"

    def __setstate__(self, state):
        self.byteorder = state[1] if isinstance(state, tuple) and len(state) > 1 else None

    def numpy(self) -> np.dtype:
        if self.byteorder not in ("<", "|", "="):
            raise ValueError(f"array of dtype {self.code} has byte order {self.byteorder!r}: expected little-endian")
        return np.dtype(_DTYPES[self.code])


class _ArrayRef:
    """An array as the pickle declares it (shape, dtype, order, raw bytes), built after unpickling."""

    def __setstate__(self, state):
        self.state = state

    def build(self, key: str) -> np.ndarray:
        """The array, copied out; ValueError naming `key` where its state is not a plain array's."""
        state = getattr(self, "state", None)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise ValueError(f"{key!r}: expected an array state (version, shape, dtype, order, data)")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
                and isinstance(dtype, _DType) and isinstance(fortran, bool) and isinstance(raw, bytes)):
            raise ValueError(f"{key!r}: expected an array state of integer shape, dtype, order flag and bytes")
        dtype = dtype.numpy()
        if len(raw) != int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise ValueError(f"{key!r}: {len(raw)} bytes of data for shape {shape} of {dtype}")
        return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(cls, shape, typecode):
    """numpy's `_reconstruct(ndarray, (0,), b'b')`: an empty array whose state the pickle then sets."""
    if cls is not _NdarrayClass:
        raise pickle.UnpicklingError("refusing _reconstruct of anything but numpy.ndarray")
    return _ArrayRef()


def _latin1(text, encoding):
    """`_codecs.encode(text, 'latin1')`: how protocol 2 pickles bytes."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _pair(items):
    """`tuple(((name, array),))` -> (name, array): how paddle pickles a tensor outside a state dict."""
    return tuple(items)


_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x
    ("numpy", "ndarray"): _NdarrayClass,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _latin1,
    ("builtins", "tuple"): _pair,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        raise pickle.UnpicklingError(f"refusing pickle global {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id: not part of a plain state dict")


def _array(key: str, value) -> np.ndarray:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]
    if not isinstance(value, _ArrayRef):
        raise ValueError(f"{key!r} is not a tensor: expected a state dict of tensors only")
    return value.build(key)


def load_paddle_state_dict(path: str) -> dict[str, np.ndarray]:
    """`model_state.pdparams` -> {name: array}; raises pickle.UnpicklingError or ValueError for anything else."""
    with open(path, "rb") as f:
        state = _Unpickler(f).load()
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"expected a dict of name -> tensor, found {type(state).__name__}")
    state.pop(_NAME_TABLE, None)
    split = state.pop(_SPLIT_INFO, {})
    tensors = {key: _array(key, value) for key, value in state.items()}
    if not isinstance(split, dict):
        raise ValueError(f"{_SPLIT_INFO}: expected a dict, found {type(split).__name__}")
    for key, info in split.items():
        try:
            parts = [tensors.pop(part) for part in info["slices"]]
            tensors[key] = np.concatenate(parts).reshape(info["OriginShape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{_SPLIT_INFO}: cannot join the slices of {key!r} ({type(e).__name__}: {e})") from None
    return tensors
