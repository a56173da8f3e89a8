"""ggml itself as the reference for quantkit's codecs: `ggml_quantize_chunk` from the libggml-base shared
library that llama-cpp-python ships (the code llama-quantize runs), called through ctypes.

Used by the byte-exactness tests and benchmarks; `available()` is False where llama-cpp-python is not
installed, and callers skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import re
from collections.abc import Iterator
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
                   **options) -> None:
    """llama.cpp's quantizer (what llama-quantize runs) through llama-cpp-python's binding. `importance`:
    GGUF weight name -> float32 vector, already normalised (in_sum2 / count) as tools/quantize does; `options`:
    those of llama_quantize_types."""
    import llama_cpp

    params, keep = _quantize_params(ftype, nthread, importance, **options)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {src} -> {out}")


def llama_quantize_types(src, ftype: int, *, importance: dict[str, np.ndarray] | None = None, pure: bool = False,
                         tensor_types=(), output_tensor_type: str | None = None,
                         token_embedding_type: str | None = None) -> list[tuple[str, str]]:
    """The (tensor name, ggml type name) llama-quantize would write, in its order, from its --dry-run: the type
    choice without the quantizing (milliseconds instead of minutes for the i-quants). A dry run refuses nothing;
    llama_quantize does, before it quantizes anything. `tensor_types`: llama-quantize's --tensor-type
    PATTERN=TYPE strings."""
    import llama_cpp

    params, keep = _quantize_params(ftype, 1, importance, pure=pure, tensor_types=tensor_types,
                                    output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type)
    params.dry_run = True
    with llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), b"", ctypes.byref(params))
    del keep
    log = "".join(lines)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize --dry-run failed ({rc}) for {src}: {log[-2000:]}")
    # "[  3/ 40] blk.0.attn_k.weight - [  256,    64,     1,     1], type =    f32, size =  0.062 MiB ->  0.009 MiB
    # (q4_K)"; a tensor kept as it is has no "(type)"
    rows = re.findall(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size = [^\n]*?(?:\((\w+)\))?\n", log)
    return [(name, (new or old).upper()) for name, old, new in rows]


def _quantize_params(ftype: int, nthread: int, importance: dict[str, np.ndarray] | None, *, pure: bool = False,
                     tensor_types=(), output_tensor_type: str | None = None, token_embedding_type: str | None = None):
    """llama_model_quantize_params and the buffers it points to (keep them alive until the call returns)."""
    import llama_cpp
    from gguf import GGMLQuantizationType

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, nthread, pure
    if output_tensor_type:
        params.output_tensor_type = GGMLQuantizationType[output_tensor_type.upper()].value
    if token_embedding_type:
        params.token_embedding_type = GGMLQuantizationType[token_embedding_type.upper()].value
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
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, spec in enumerate(tensor_types):
            pattern, type_name = spec.split("=")
            keep.append(pattern.lower().encode())  # lower-cased, as llama-quantize's parse_tensor_type
            overrides[i].pattern = keep[-1]
            overrides[i].type = GGMLQuantizationType[type_name.upper()].value
        overrides[len(tensor_types)].pattern = None
        keep.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return params, keep


@contextlib.contextmanager
def llama_log() -> Iterator[list[str]]:
    """llama.cpp's log text while inside, collected instead of llama-cpp-python's printing it."""
    import llama_cpp
    from llama_cpp import _logger

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        chunks.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


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
