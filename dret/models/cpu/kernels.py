"""Native CPU kernels: XLA FFI handlers in C++ next to this file, compiled for this CPU on first use.

The shared library is built once per source, jaxlib and CPU with the system C++ compiler (`$CXX`, default g++)
into `$DRET_KERNEL_CACHE` (default `~/.cache/dret/kernels`). Without a compiler, or with `DRET_NATIVE_KERNELS=0`,
callers get None and keep XLA's own ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax

ATTENTION_SOURCE = os.path.join(os.path.dirname(__file__), "attention.cc")
ATTENTION_TARGET = "dret_cpu_attention"
_FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w")


def _cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dret", "kernels")
    return os.environ.get("DRET_KERNEL_CACHE", default)


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(source: str, compiler: str) -> str:
    """Path of the shared library for `source`, compiled into the cache unless an identical build is there."""
    with open(source, "rb") as f:
        text = f.read()
    key = hashlib.sha256(b"\0".join([text, " ".join((compiler, *_FLAGS)).encode(), jax.__version__.encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(source))[0]
    out = os.path.join(_cache_dir(), f"{name}-{key}.so")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, "-I", jax.ffi.include_dir(), source, "-o", tmp],
                           check=True, capture_output=True, text=True)
            os.replace(tmp, out)  # atomic: a concurrent build or a crash never leaves a partial library
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return out


def load(source: str):
    """The compiled `source` as a ctypes library; None, warned, when it cannot be built."""
    name = os.environ.get("CXX", "g++")
    compiler = shutil.which(name)
    try:
        if compiler is None:
            raise OSError(f"no C++ compiler {name!r} on PATH")
        return ctypes.cdll.LoadLibrary(_build(source, compiler))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        warnings.warn(f"dret: could not build {source} ({detail}); CPU attention runs on XLA's ops (slower "
                      "encoding)", stacklevel=3)
        return None


@functools.cache
def attention_target() -> str | None:
    """FFI target name of the fused float32 attention (`attention.cc`), registered for the CPU platform;
    None when native kernels are off or cannot be built."""
    library = None if os.environ.get("DRET_NATIVE_KERNELS", "1") == "0" else load(ATTENTION_SOURCE)
    if library is None:
        return None
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(library.DretCpuAttention), platform="cpu")
    return ATTENTION_TARGET
