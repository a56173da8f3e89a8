"""The compiled CPU codecs (quantkit/quant/_ggml_kernels.c): ggml's quantizers as plain C loops, byte-exact with
the torch codecs, which stay the fallback (no compiler at install time) and the CUDA path.

The library is a C extension that setup.py builds (optional: without a compiler the install still succeeds) and
this module loads through ctypes, which releases the GIL for the whole call: a chunk encodes on a thread while
other threads run, so ChunkEncoder needs no worker processes for it.

QUANTKIT_CODEC_IMPL chooses the implementation: `auto` (default: the kernels where built, for the types they
encode, on CPU tensors), `torch` (never the kernels), `kernel` (the kernels, an error where they are not built).
The tests run every codec test under `torch` and `kernel`."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import threading
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError

ENV = "QUANTKIT_CODEC_IMPL"
_MODULE = "_ggml_kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library next to this file (an extension-module file name), or None."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / (_MODULE + suffix)
        if path.exists():
            lib = ctypes.CDLL(str(path))  # CDLL: every call releases the GIL
            lib.qk_quantize.restype = ctypes.c_int
            lib.qk_quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64]
            lib.qk_supported.restype = ctypes.c_int
            lib.qk_supported.argtypes = [ctypes.c_int]
            lib.qk_iq3_grid_init.restype = ctypes.c_int
            lib.qk_iq3_grid_init.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
            return lib
    return None


def available() -> bool:
    return library() is not None


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "torch", "kernel"):
        raise QuantkitError(f"{ENV}={value!r}: expected auto, torch or kernel")
    return value


@functools.cache
def _supported(type_id: int) -> bool:
    lib = library()
    return lib is not None and bool(lib.qk_supported(type_id))


def handles(type_id: int, device: torch.device | str = "cpu") -> bool:
    """Whether encode() of this ggml type on this device goes through the compiled kernels."""
    if torch.device(device).type != "cpu":
        return False
    chosen = mode()
    if chosen == "torch":
        return False
    if chosen == "kernel" and not available():
        raise QuantkitError(f"{ENV}=kernel, but quantkit's compiled codecs are not built (reinstall quantkit with "
                            "a C compiler, or `python setup.py build_ext --inplace` in a checkout)")
    return _supported(type_id)


def require(type_id: int, name: str) -> None:
    """For the codecs that only the kernels encode (Codec.kernel_only): a clear error where they are not built."""
    lib = library()
    if lib is None or not lib.qk_supported(type_id):
        raise QuantkitError(f"{name} is encoded only by quantkit's compiled codecs, which are not built (reinstall "
                            "quantkit with a C compiler, or `python setup.py build_ext --inplace` in a checkout)")


# The lattice types' grids, taken from gguf-py (its grid_map values, indexed by the level 0..7 of each element)
# and handed to the library once per type before its first encode.
_LATTICE_GRIDS = {18: "IQ3_XXS", 21: "IQ3_S"}
_lattice_lock = threading.Lock()
_lattices_ready: set[int] = set()


def lattice_levels(name: str) -> np.ndarray:
    """uint8 [points * 4]: the level index (position in grid_map) of every element of gguf-py's grid."""
    from gguf import quants

    quant = getattr(quants, name)
    quant.init_grid()
    grid = quant.grid.reshape(quant.grid_shape)
    values = np.asarray(quant.grid_map, dtype=np.float32)
    levels = np.searchsorted(values, grid)
    assert np.array_equal(values[levels], grid)
    return np.ascontiguousarray(levels, dtype=np.uint8).reshape(-1)


def _prepare(type_id: int) -> None:
    if type_id not in _LATTICE_GRIDS or type_id in _lattices_ready:
        return
    with _lattice_lock:
        if type_id in _lattices_ready:
            return
        levels = lattice_levels(_LATTICE_GRIDS[type_id])
        if library().qk_iq3_grid_init(type_id, levels.ctypes.data, levels.size) != 0:
            raise QuantkitError(f"compiled codec rejected gguf-py's {_LATTICE_GRIDS[type_id]} grid")
        _lattices_ready.add(type_id)


def encode(type_id: int, x: torch.Tensor, importance: torch.Tensor | None, row_bytes: int) -> torch.Tensor:
    """float32 [rows, n] on CPU -> uint8 [rows, row_bytes] through qk_quantize."""
    _prepare(type_id)
    x = x.to(torch.float32).contiguous()
    imp = None if importance is None else importance.to(torch.float32).contiguous()
    rows, n = x.shape
    out = torch.empty(rows, row_bytes, dtype=torch.uint8)
    if rows:
        status = library().qk_quantize(type_id, x.data_ptr(), None if imp is None else imp.data_ptr(),
                                       out.data_ptr(), rows, n)
        if status == -3:  # ggml itself aborts the process on such rows
            raise QuantkitError(f"ggml type {type_id}: values too large to encode (a lattice search found no finite "
                                "distance)")
        if status != 0:
            raise QuantkitError(f"compiled codec refused ggml type {type_id} for rows of {n}")
    return out
