"""Reading GGUF files back: tensor table, metadata and dequantized tensors (quantkit's codecs; gguf-py's
dequantizers for ggml types quantkit does not write)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError, SourceError
from quantkit.formats.gguf.file import StoredTensor, Value, read_header
from quantkit.quant import CODECS, get_codec

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such GGUF file")
        try:
            header = read_header(self.path)
        except OSError as exc:
            raise SourceError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        except QuantkitError as exc:
            raise SourceError(str(exc)) from exc
        self.values: dict[str, Value] = header.metadata
        self.tensors: dict[str, StoredTensor] = header.tensors
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self.tensors else None

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
        return self._map[t.offset:t.offset + t.nbytes]

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
