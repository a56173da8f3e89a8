"""ggml itself as the reference for quantkit's codecs: `ggml_quantize_chunk` from the libggml-base shared
library that llama-cpp-python ships (the code llama-quantize runs), called through ctypes.

Used by the byte-exactness tests and benchmarks; `available()` is False where llama-cpp-python is not
installed, and callers skip.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np


@functools.cache
def library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib_dir = Path(spec.origin).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml-base.dylib"))
    if not candidates:
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def available() -> bool:
    return library() is not None


def quantize(type_id: int, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml's bytes for float32 rows x [rows, n]: uint8 [rows, row_size]."""
    lib = library()
    if lib is None:
        raise RuntimeError("llama-cpp-python (with its libggml-base) is not installed")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    row_size = lib.ggml_row_size(type_id, n)
    out = np.zeros((rows, row_size), dtype=np.uint8)
    imatrix = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        imatrix = importance.ctypes.data
    written = lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, n, imatrix)
    assert written == out.nbytes, (written, out.nbytes)
    return out
