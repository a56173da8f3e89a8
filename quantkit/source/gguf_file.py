"""Reading GGUF files back: tensor table, metadata and dequantized tensors (quantkit's codecs; gguf-py's
dequantizers for ggml types quantkit does not write)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quantkit.errors import SourceError
from quantkit.quant import CODECS, get_codec


class GGUFFile:
    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such GGUF file")
        try:
            self._reader = GGUFReader(self.path)
        except (ValueError, OSError) as exc:
            raise SourceError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.tensors = {t.name: t for t in self._reader.tensors}

    def fields(self) -> dict:
        return dict(self._reader.fields)

    def metadata(self, key: str):
        field = self._reader.get_field(key)
        return None if field is None else field.contents()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """float32 tensor in torch order."""
        if name not in self.tensors:
            raise SourceError(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        shape = self.shape(name)
        type_name = t.tensor_type.name
        if type_name in CODECS:
            codec = get_codec(type_name)
            raw = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8).reshape(-1)).to(device)
            row_bytes = shape[-1] // codec.block_size * codec.block_bytes
            return codec.decode(raw.reshape(-1, row_bytes), shape[-1]).reshape(shape)
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape).to(device)
