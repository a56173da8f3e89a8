"""A Hugging Face checkpoint: a model folder (config.json + one or many .safetensors) or one .safetensors file.

Listing reads only headers. Reading returns one tensor at a time in float32 (or a requested dtype) on a
requested device, through the checkpoint's input decoder (quantkit.source.decoders): FP8 weights with a
`weight_scale_inv` sibling are dequantized on the way, and the scale tensors are hidden from the listing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import ConfigError, SourceError
from quantkit.source.decoders import BlockFP8Decoder, decoder_for
from quantkit.source.safetensors_file import FLOAT_DTYPES, SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # stored dtype, safetensors spelling (BF16, F8_E4M3, ...)
    nbytes: int  # stored bytes, including the block scales of an FP8 weight
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class HFCheckpoint:
    """Tensors by name, from a model folder or a single safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            self.config = _read_config(self.path)
            shard_of = _shard_map(self.path)
        elif self.path.suffix == ".safetensors":
            self.config = None
            shard_of = None
        else:
            raise SourceError(f"{self.path}: not a model folder or a .safetensors file")

        self._files: dict[str, SafetensorsFile] = {}
        self._location: dict[str, SafetensorsFile] = {}
        if shard_of is None:
            single = SafetensorsFile(self.path)
            self._files[self.path.name] = single
            self._location = dict.fromkeys(single.entries, single)
        else:
            for shard in sorted(set(shard_of.values())):
                self._files[shard] = SafetensorsFile(self.path / shard)
            for name, shard in shard_of.items():
                file = self._files[shard]
                if name not in file:
                    raise SourceError(f"{file.path}: the index {INDEX_NAME} places tensor {name!r} in this shard, "
                                      "but the shard does not contain it; the shard or the index is from another "
                                      "download — re-download both")
                self._location[name] = file

        self.decoder = decoder_for(self._location, self.config, str(self.path))
        self._companion_of = self.decoder.companions()
        self._virtual = self.decoder.virtual()
        hidden = set(self._companion_of.values()).union(*(parts for _, parts in self._virtual.values()))
        self._infos = {name: self._info(name) for name in self._location if name not in hidden}
        self._infos.update({name: self._virtual_info(name) for name in self._virtual})

    # ---- listing -------------------------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise SourceError(f"{self.path}: no tensor named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    @property
    def is_fp8(self) -> bool:
        return isinstance(self.decoder, BlockFP8Decoder) and bool(self._companion_of)

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        return self.decoder.block if isinstance(self.decoder, BlockFP8Decoder) else None

    def label(self) -> str:
        """How the weights are stored: BF16, FP8 (128x128 blocks), ..."""
        return self.decoder.label({i.dtype for i in self._infos.values() if len(i.shape) >= 2})

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files.values()]

    def file_identity(self) -> list[tuple[str, int, int]]:
        """(name, size, mtime_ns) of every file: what a cache or a resumed run keys on to notice a changed
        checkpoint without hashing gigabytes."""
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    # ---- reading -------------------------------------------------------------------------------------
    def read(self, name: str, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, decoded (e.g. block FP8 dequantized), converted to `dtype`, on `device`."""
        info = self.info(name)
        decoded = self.decoder.read(name, device)
        if decoded is not None:
            return decoded.to(dtype)
        file = self._location[name]
        if info.dtype in FLOAT_DTYPES and dtype.is_floating_point:
            return file.read(name, device=device, dtype=dtype)
        return file.read(name, device=device)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- helpers -------------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        file = self._location[name]
        entry = file.entries[name]
        nbytes = entry.nbytes
        companion = self._companion_of.get(name)
        if companion is not None:
            nbytes += self._location[companion].entries[companion].nbytes
        return TensorInfo(name, entry.shape, entry.dtype, nbytes, file.path.name)

    def _virtual_info(self, name: str) -> TensorInfo:
        shape, parts = self._virtual[name]
        nbytes = sum(self._location[p].entries[p].nbytes for p in parts)
        return TensorInfo(name, shape, self.decoder.name.upper(), nbytes, self._location[parts[0]].path.name)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json; a model folder needs the config.json it was published with "
                          "(copy it next to the weights)")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def _shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index, or from the lone weights file when there is no index."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SourceError(f"{index_path}: corrupt index (expected JSON with a 'weight_map' object): {exc}") from exc
        missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
        if missing:
            raise SourceError(f"{folder}: shard {missing[0]} listed in {INDEX_NAME} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; download the missing shards")
        return dict(weight_map)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise SourceError(f"{folder}: no .safetensors weights and no {INDEX_NAME}")
    if len(shards) > 1:
        raise SourceError(f"{folder}: {len(shards)} .safetensors files but no {INDEX_NAME} saying which tensor is "
                          "where; add the index from the original download")
    return dict.fromkeys(SafetensorsFile(folder / shards[0]).entries, shards[0])
