"""Reading GGUF files back: tensor table, metadata and dequantized tensors (quantkit's codecs; gguf-py's
dequantizers for ggml types quantkit does not write)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError, SourceError
from quantkit.formats.gguf.file import StoredTensor, Value, read_header, split_path
from quantkit.quant import CODECS, get_codec

SHARD_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class GGUFFile:
    """A GGUF file, or a gguf-split set opened by its first shard (the model's metadata is the first shard's; the
    tensor table is every shard's, as llama.cpp's loader sees it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = _header(self.path)
        self.values: dict[str, Value] = header.metadata
        self.tensors: dict[str, StoredTensor] = dict(header.tensors)
        self.paths = [self.path, *self._other_shards()]
        self._shard_of = dict.fromkeys(self.tensors, 0)
        for index, shard in enumerate(self.paths[1:], 1):
            for name, tensor in _header(shard).tensors.items():
                self.tensors[name], self._shard_of[name] = tensor, index
        self._maps = [np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else None for p in self.paths]

    def _other_shards(self) -> list[Path]:
        count = self.metadata("split.count") or 1
        if count == 1:
            return []
        match = SHARD_NAME.match(self.path.name)
        if self.metadata("split.no") != 0 or match is None:
            raise SourceError(f"{self.path}: a shard of a gguf-split set; give its first shard "
                              "(<name>-00001-of-000NN.gguf)")
        first = self.path.with_name(match["prefix"] + ".gguf")
        shards = [split_path(first, i, count) for i in range(1, count)]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise SourceError(f"{self.path}: the gguf-split set has {count} shards; missing {', '.join(missing)} "
                              "beside it")
        return shards

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def metadata(self, key: str):
        value = self.values.get(key)
        return None if value is None else value.value

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def type_name(self, name: str) -> str:
        return self.tensors[name].type.name

    def data(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (a read-only view of the mapped file)."""
        t = self.tensors[name]
        return self._maps[self._shard_of[name]][t.offset:t.offset + t.nbytes]

    def stored(self, name: str) -> torch.Tensor:
        """An F32/F16/BF16 tensor's values as stored, in torch order: a read-only view of the mapped file, no copy
        (never write to it). The GGUF requantizer converts it to float32 chunk by chunk on its encoding threads."""
        dtype = _FLOAT_DTYPES.get(self.type_name(name))
        if dtype is None:
            raise SourceError(f"{self.path}: tensor {name!r} is {self.type_name(name)}, not a float type")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns that the read-only map is not writable
            raw = torch.from_numpy(self.data(name))
        return raw.view(dtype).reshape(self.shape(name))

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """float32 tensor in torch order."""
        if name not in self.tensors:
            raise SourceError(f"{self.path}: no tensor {name!r}")
        shape, type_name = self.shape(name), self.type_name(name)
        if type_name in CODECS:
            codec = get_codec(type_name)
            raw = torch.from_numpy(np.array(self.data(name))).to(device)
            row_bytes = shape[-1] // codec.block_size * codec.block_bytes
            return codec.decode(raw.reshape(-1, row_bytes), shape[-1]).reshape(shape)
        from gguf.quants import dequantize

        data = self.data(name).reshape(-1, self.tensors[name].nbytes // math.prod(shape[:-1]))
        return torch.from_numpy(dequantize(data, self.tensors[name].type).astype(np.float32)).reshape(shape).to(device)


def _header(path: Path):
    if not path.is_file():
        raise SourceError(f"{path}: no such GGUF file")
    try:
        return read_header(path)
    except OSError as exc:
        raise SourceError(f"{path}: not a readable GGUF file ({exc})") from exc
    except QuantkitError as exc:
        raise SourceError(str(exc)) from exc
