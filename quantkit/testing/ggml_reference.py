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


def llama_quantize(src, out, ftype: int, *, nthread: int = 1, importance: dict[str, np.ndarray] | None = None,
                   pure: bool = False) -> None:
    """llama.cpp's quantizer (what llama-quantize runs) through llama-cpp-python's binding. `importance`:
    GGUF weight name -> float32 vector, already normalised (in_sum2 / count) as tools/quantize does."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, nthread, pure
    keep = []
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, vector) in enumerate(importance.items()):
            data = np.ascontiguousarray(vector, dtype=np.float32)
            keep += [data, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(importance)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {src} -> {out}")


def tensor_data_digest(path) -> str:
    """sha256 over a GGUF's tensors (name, type, bytes, in name order): equal for files whose metadata differ."""
    import hashlib

    from quantkit.source.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    digest = hashlib.sha256()
    for name in sorted(gguf.tensors):
        digest.update(f"{name}:{gguf.type_name(name)}:".encode())
        digest.update(np.ascontiguousarray(gguf.data(name)).tobytes())
    return digest.hexdigest()
