"""The compiled CPU codecs (quantkit/quant/_ggml_kernels.c): ggml's quantizers as plain C loops, byte-exact with
the torch codecs, which stay the fallback (no compiler at install time) and the CUDA path.

The library is a C extension that setup.py builds (optional: without a compiler the install still succeeds) and
this module loads through ctypes, which releases the GIL for the whole call: a chunk encodes on a thread while
other threads run, so ChunkEncoder needs no worker processes for it.

The grid i-quants (IQ2_XXS/XS/S, IQ1_S/M, in _ggml_iq2.c of the same library) have no torch encoder: their
codecs (Codec.kernel_only) take the kernels whatever is chosen below, and their grids reach the library through
register_grid before the first encode.

QUANTKIT_CODEC_IMPL chooses the implementation: `auto` (default: the kernels where built, for the types they
encode, on CPU tensors), `torch` (never the kernels), `kernel` (the kernels, an error where they are not built).
The tests run every codec test under `torch` and `kernel`."""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import threading
from collections.abc import Callable
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
            lib.qk_iq_grid_init.restype = ctypes.c_int
            lib.qk_iq_grid_init.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
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


def supports(type_id: int) -> bool:
    """Whether the kernels are built and encode this ggml type, whatever QUANTKIT_CODEC_IMPL says."""
    return available() and _supported(type_id)


# The grid i-quants' codebooks, passed to the library before its first encode of the type: ggml type id ->
# a function returning the grid's levels (uint8 [points, 8], each 0..2, in grid order).
_GRIDS: dict[int, Callable[[], np.ndarray]] = {}
_grids_set: set[int] = set()
_grid_lock = threading.Lock()


def register_grid(type_id: int, levels: Callable[[], np.ndarray]) -> None:
    _GRIDS[type_id] = levels


def _set_grid(lib: ctypes.CDLL, type_id: int) -> None:
    """qk_iq_grid_init once per type, under a lock: encodes on other threads may be waiting."""
    if type_id not in _GRIDS or type_id in _grids_set:
        return
    with _grid_lock:
        if type_id in _grids_set:
            return
        levels = np.ascontiguousarray(_GRIDS[type_id](), dtype=np.uint8)
        if lib.qk_iq_grid_init(type_id, levels.ctypes.data, levels.shape[0]) != 0:
            raise QuantkitError(f"compiled codecs: the grid of ggml type {type_id} was refused "
                                f"({levels.shape[0]} points)")
        _grids_set.add(type_id)


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


def encode(type_id: int, x: torch.Tensor, importance: torch.Tensor | None, row_bytes: int) -> torch.Tensor:
    """float32 [rows, n] on CPU -> uint8 [rows, row_bytes] through qk_quantize."""
    x = x.to(torch.float32).contiguous()
    imp = None if importance is None else importance.to(torch.float32).contiguous()
    rows, n = x.shape
    out = torch.empty(rows, row_bytes, dtype=torch.uint8)
    if rows:
        _set_grid(library(), type_id)
        status = library().qk_quantize(type_id, x.data_ptr(), None if imp is None else imp.data_ptr(),
                                       out.data_ptr(), rows, n)
        if status != 0:
            why = {-3: "no grid point scores below FLT_MAX in a block (values so large that the weighted "
                       "squared error overflows float32, or non-finite; ggml aborts on such rows)",
                   -4: "it needs an importance vector"}.get(status, f"for rows of {n}")
            raise QuantkitError(f"compiled codec refused ggml type {type_id}: {why}")
    return out
