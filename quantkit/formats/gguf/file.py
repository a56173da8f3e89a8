"""GGUF v3 files: a streaming writer (header and tensor table first, then each tensor's bytes as it is
produced) that writes under a temporary name and renames when complete, with optional gguf-split shards.

Layout facts: ggml's gguf.cpp (`gguf_init_from_file_impl`, `gguf_write_to_file`) and docs/gguf.md; shard
naming and split.* keys: gguf-py constants `Keys.Split` / llama.cpp's `llama_split_path`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quantkit.errors import QuantkitError
from quantkit.output import write_error

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; we never write general.alignment
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class Value:
    """A typed metadata value: llama.cpp reads scalars with the exact stored type, so types are explicit."""

    type: GGUFValueType
    value: object
    item_type: GGUFValueType | None = None  # for arrays


def u32(v: int) -> Value:
    return Value(GGUFValueType.UINT32, int(v))


def i32(v: int) -> Value:
    return Value(GGUFValueType.INT32, int(v))


def u16(v: int) -> Value:
    return Value(GGUFValueType.UINT16, int(v))


def f32(v: float) -> Value:
    return Value(GGUFValueType.FLOAT32, float(v))


def boolean(v: bool) -> Value:
    return Value(GGUFValueType.BOOL, bool(v))


def string(v: str) -> Value:
    return Value(GGUFValueType.STRING, str(v))


def array(item_type: GGUFValueType, values: Iterable) -> Value:
    return Value(GGUFValueType.ARRAY, list(values), item_type)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: GGUF name, torch-order shape (ggml's ne is the reverse), ggml type."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.type)


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise QuantkitError(f"rows of {shape[-1]} elements cannot be stored as {qtype.name} "
                            f"(blocks of {block})")
    return math.prod(shape[:-1]) * shape[-1] // block * type_size


def _pad(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _string_bytes(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value_bytes(vtype: GGUFValueType, value, item_type: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string_bytes(value)
    if vtype == GGUFValueType.ARRAY:
        if item_type in (GGUFValueType.ARRAY, None):
            raise ValueError("GGUF arrays need a scalar or string item type (ggml rejects nested arrays)")
        head = struct.pack("<IQ", int(item_type), len(value))
        if item_type == GGUFValueType.STRING:
            return head + b"".join(_string_bytes(v) for v in value)
        return head + np.asarray(value, dtype=np.dtype(_SCALAR_FORMATS[item_type])).tobytes()
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def header_bytes(metadata: dict[str, Value], tensors: list[TensorEntry]) -> bytes:
    """Everything before the data section, padded to the alignment."""
    out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, v in metadata.items():
        out += [_string_bytes(key), struct.pack("<I", int(v.type)), _value_bytes(v.type, v.value, v.item_type)]
    offset = 0
    for t in tensors:
        if len(t.name.encode()) > MAX_NAME_BYTES:
            raise QuantkitError(f"tensor name {t.name!r} is longer than GGUF's {MAX_NAME_BYTES} bytes")
        ne = tuple(reversed(t.shape))
        out += [_string_bytes(t.name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                struct.pack("<IQ", int(t.type), offset)]
        offset += _pad(t.nbytes)
    raw = b"".join(out)
    return raw + b"\0" * (_pad(len(raw)) - len(raw))


def write_sparse(path: Path, metadata: dict[str, Value], tensors: list[TensorEntry]) -> int:
    """A complete GGUF file whose data section is a hole: the header and tensor table written, then the file
    extended to its full size without writing (a sparse file: no disk blocks, reads give zeros). A loader sees
    the real file (every offset and size valid) at no cost in disk, for checks of its bookkeeping that never
    read a weight (bench/plan_fullscale.py: llama.cpp's buffers for a 671B model's table). Returns the size."""
    header = header_bytes(metadata, tensors)
    size = len(header) + sum(_pad(t.nbytes) for t in tensors)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
    return size


@dataclass(frozen=True)
class StoredTensor(TensorEntry):
    """A tensor of a file being read: where its bytes start (absolute file offset)."""

    offset: int = 0


@dataclass
class GGUFHeader:
    metadata: dict[str, Value]
    tensors: dict[str, StoredTensor]


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        n = self.take("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, vtype: GGUFValueType):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = GGUFValueType(self.take("<I")), self.take("<Q")
            if item_type == GGUFValueType.STRING:
                return Value(vtype, [self.string() for _ in range(count)], item_type)
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return Value(vtype, items.tolist(), item_type)
        return self.take(_SCALAR_FORMATS[vtype])


def read_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table of one GGUF file (a shard is one file), parsed with struct on the mapped
    header: gguf-py's reader builds numpy views per field and takes seconds on a 128k-token vocabulary."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        try:
            if cur.take("<4s") != GGUF_MAGIC:
                raise QuantkitError(f"{path}: not a GGUF file (bad magic)")
            version, n_tensors, n_kv = cur.take("<IQQ")
            if version not in (2, 3):
                raise QuantkitError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            metadata: dict[str, Value] = {}
            for _ in range(n_kv):
                key, vtype = cur.string(), GGUFValueType(cur.take("<I"))
                value = cur.value(vtype)
                metadata[key] = value if isinstance(value, Value) else Value(vtype, value)
            infos = []
            for _ in range(n_tensors):
                name, n_dims = cur.string(), cur.take("<I")
                ne = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
                cur.pos += 8 * n_dims
                qtype, offset = cur.take("<IQ")
                infos.append((name, tuple(reversed(ne)), GGMLQuantizationType(qtype), offset))
        except (struct.error, ValueError) as exc:
            raise QuantkitError(f"{path}: corrupt or truncated GGUF header ({exc})") from exc
        alignment = metadata.get("general.alignment", Value(GGUFValueType.UINT32, ALIGNMENT)).value
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        size = len(buf)
    tensors = {}
    for name, shape, qtype, offset in infos:
        tensor = StoredTensor(name, shape, qtype, data_start + offset)
        if tensor.offset + tensor.nbytes > size:
            raise QuantkitError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        tensors[name] = tensor
    return GGUFHeader(metadata, tensors)


def split_path(path: Path, index: int, count: int) -> Path:
    """llama.cpp's shard naming: <prefix>-00001-of-00003.gguf."""
    prefix = str(path)[: -len(".gguf")] if str(path).endswith(".gguf") else str(path)
    return Path(f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf")


def plan_shards(tensors: list[TensorEntry], max_bytes: int | None) -> list[list[TensorEntry]]:
    """Greedy split by data size, like gguf-split --split-max-size: a tensor never spans two shards."""
    if not max_bytes:
        return [tensors]
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _pad(t.nbytes)
    return shards


class GGUFWriter:
    """Streams one GGUF file (or a set of gguf-split shards).

    The tensor table is fixed up front, so each tensor's bytes can be written the moment they exist and
    dropped. Files are written as `<name>.part` and renamed only by `finish()`; `abort()` (or an exception
    inside a `with` block) removes the partial files, so nothing incomplete ever carries a final name.
    """

    def __init__(self, path: Path, metadata: dict[str, Value], tensors: list[TensorEntry],
                 split_max_bytes: int | None = None):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise QuantkitError("duplicate tensor names in the GGUF tensor table")
        self.shards = plan_shards(tensors, split_max_bytes)
        count = len(self.shards)
        self.paths = [path] if count == 1 else [split_path(path, i, count) for i in range(count)]
        self._parts = [p.with_name(p.name + ".part") for p in self.paths]
        self._metadata = metadata
        self._order = iter([(i, t) for i, shard in enumerate(self.shards) for t in shard])
        self._file = None
        self._shard = -1
        self._current: TensorEntry | None = None
        self._written = 0
        self._done = False

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    def _open_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        # As gguf-split: the model's metadata lives in the first shard; every shard carries split.*, which
        # llama.cpp's loader uses to find and check the others.
        metadata = dict(self._metadata) if index == 0 else {}
        if len(self.shards) > 1:
            metadata.update({"split.no": u16(index), "split.count": u16(len(self.shards)),
                             "split.tensors.count": i32(sum(len(s) for s in self.shards))})
        with self._writing(index):
            self._parts[index].parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._parts[index], "wb")
            self._file.write(header_bytes(metadata, self.shards[index]))
        self._shard = index

    @contextlib.contextmanager
    def _writing(self, index: int):
        """OSError (a full disk, a read-only mount) as one OutputError naming the file being written."""
        try:
            yield
        except OSError as exc:
            raise write_error(self.paths[index], exc) from exc

    def write(self, name: str, data: np.ndarray | bytes) -> None:
        """Bytes of tensor `name`, in table order; a tensor may arrive in several consecutive pieces."""
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).view(np.uint8).tobytes()
        if self._current is None:
            try:
                shard, self._current = next(self._order)
            except StopIteration:
                raise QuantkitError(f"tensor {name!r} is not in the GGUF tensor table") from None
            while shard != self._shard:
                self._open_shard(self._shard + 1)
            self._written = 0
        entry = self._current
        if entry.name != name:
            raise QuantkitError(f"tensor {name!r} written out of order; expected {entry.name!r}")
        self._written += len(raw)
        if self._written > entry.nbytes:
            raise QuantkitError(f"tensor {name!r}: more than the {entry.nbytes} bytes of "
                                f"{entry.type.name} {list(entry.shape)}")
        with self._writing(self._shard):
            self._file.write(raw)
            if self._written == entry.nbytes:
                self._file.write(b"\0" * (_pad(entry.nbytes) - entry.nbytes))
        if self._written == entry.nbytes:
            self._current = None

    def finish(self) -> list[Path]:
        if self._current is not None or next(self._order, None) is not None:
            raise QuantkitError("GGUF writer finished before every tensor was written")
        if self._file is None:  # a file with no tensors still gets its header
            self._open_shard(0)
        with self._writing(self._shard):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            for part, final in zip(self._parts, self.paths, strict=True):
                os.replace(part, final)
        self._done = True
        return self.paths

    def abort(self) -> None:
        """Close and remove the partial files. Never raises: the error that stopped the write is the one to
        report (closing flushes the buffer, which fails again on a full disk)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        for part in self._parts:
            try:
                part.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", part, exc.strerror or exc)
