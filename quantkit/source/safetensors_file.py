"""One .safetensors file: header parsed and validated up front, tensor data read through a memory map.

Reading copies one tensor out of the map and then drops the mapped pages again, so reading every tensor of
a checkpoint once keeps only a few tensors resident, whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import SourceError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}

# Headers of real checkpoints are well under this; a larger length means the first 8 bytes are not a header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_CHUNK_BYTES = 16 * 2**20  # mapped bytes resident at once while reading


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries, self.metadata = _parse_header(self.path)
        self._file = None
        self._map: mmap.mmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, converted to `dtype` (default: as stored), owning its memory (not a view of the map).

        Copied from the map in chunks, each chunk's pages dropped after it is converted, so the peak is the
        result plus one chunk whatever the tensor's size, and a GPU read converts on arrival.
        """
        entry = self.entries[name]
        stored_dtype, itemsize = DTYPES[entry.dtype]
        out = torch.empty(entry.shape, dtype=dtype or stored_dtype, device=device)
        if entry.nbytes == 0:
            return out
        mapped = self._mapping()
        flat = out.view(-1)
        step = max(1, _CHUNK_BYTES // itemsize)
        for first in range(0, entry.numel, step):
            last = min(entry.numel, first + step)
            begin = entry.begin + first * itemsize
            chunk = torch.frombuffer(mapped, dtype=torch.uint8, count=(last - first) * itemsize, offset=begin)
            flat[first:last].copy_(chunk.view(stored_dtype))
            del chunk
            page_start = begin - begin % _PAGE
            mapped.madvise(mmap.MADV_DONTNEED, page_start, entry.begin + last * itemsize - page_start)
        return out

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._check_size_unchanged()
            self._file = open(self.path, "rb")
            # ACCESS_COPY gives a writable private view, which torch.frombuffer accepts without copying.
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def _check_size_unchanged(self) -> None:
        needed = max((e.end for e in self.entries.values()), default=0)
        if self.path.stat().st_size < needed:
            raise SourceError(f"{self.path}: file shrank since it was opened; it is being rewritten or was truncated")

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._file.close()
            self._map = self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown or a tensor view still alive: the OS reclaims the map
            pass


def _parse_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SourceError(f"{path}: truncated safetensors file ({size} bytes, shorter than its 8-byte header "
                              "length); re-download or re-copy it")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:
            raise SourceError(f"{path}: corrupt safetensors header (declared header length {header_len} bytes); "
                              "the file is not safetensors or is damaged")
        if 8 + header_len > size:
            raise SourceError(f"{path}: truncated safetensors file: header needs {8 + header_len} bytes, file has "
                              f"{size}; re-download or re-copy it")
        raw_header = f.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8").rstrip(" "))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: corrupt safetensors header (not valid JSON: {exc}); the file is damaged") from exc
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (expected a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from exc
        if dtype not in DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}; quantkit reads "
                              f"{', '.join(DTYPES)}")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end - begin != expected or begin < 0:
            raise SourceError(f"{path}: corrupt safetensors header: tensor {name!r} ({dtype}, shape {list(shape)}) "
                              f"needs {expected} bytes but its offsets [{begin}, {end}] span {end - begin}")
        if data_start + end > size:
            raise SourceError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end} "
                              f"but the file has {size} bytes; re-download or re-copy it")
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    return entries, metadata
