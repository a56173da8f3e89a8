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
from pathlib import Path

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


def encode(type_id: int, x: torch.Tensor, importance: torch.Tensor | None, row_bytes: int) -> torch.Tensor:
    """float32 [rows, n] on CPU -> uint8 [rows, row_bytes] through qk_quantize."""
    x = x.to(torch.float32).contiguous()
    imp = None if importance is None else importance.to(torch.float32).contiguous()
    rows, n = x.shape
    out = torch.empty(rows, row_bytes, dtype=torch.uint8)
    if rows:
        status = library().qk_quantize(type_id, x.data_ptr(), None if imp is None else imp.data_ptr(),
                                       out.data_ptr(), rows, n)
        if status != 0:
            raise QuantkitError(f"compiled codec refused ggml type {type_id} for rows of {n}")
    return out
