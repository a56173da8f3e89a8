"""Importance matrices as llama.cpp computes, stores and uses them.

An entry per GGUF weight: the sum over calibration tokens of the squared input activation of each input
column (`in_sum2`, one row per expert for stacked MoE weights, all heads in one row for batched 3-D weights
such as DeepSeek's attn_k_b), and the number of tokens (`counts`, one per expert for MoE weights, else one).
The importance vector the quantizer uses is in_sum2 / count, with 1.0 for experts that saw no token.

Files: llama-imatrix's GGUF output (`general.type` = imatrix, `<name>.in_sum2` / `<name>.counts`,
tools/imatrix/imatrix.cpp `save_imatrix`) and its legacy .dat format (`save_imatrix_legacy`); reading both as
tools/quantize/quantize.cpp `load_imatrix` does.
"""

from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType, GGUFValueType

from quantkit.errors import QuantkitError, SourceError
from quantkit.formats.gguf.file import GGUFWriter, TensorEntry, array, string, u32
from quantkit.output import write_error


@dataclass
class Imatrix:
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float64 [n_counts, width]
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> int64 [n_counts]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy_ncall: dict[str, int] | None = None  # set when read from a .dat file (values are pre-normalised)

    # ---- collection -----------------------------------------------------------------------------------
    def add(self, name: str, x: torch.Tensor, matrix: int = 0, n_matrices: int = 1, per_matrix_counts=False):
        """Accumulate inputs x [tokens, ne0] of weight `name` (matrix = expert or head index).

        per_matrix_counts: MoE experts keep one token count each (llama.cpp's MUL_MAT_ID path); batched
        dense weights (heads) share one count (its MUL_MAT path)."""
        x = x.reshape(-1, x.shape[-1]).double()
        width = x.shape[-1]
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_matrices, width, dtype=torch.float64, device=x.device)
            self.counts[name] = torch.zeros(n_matrices if per_matrix_counts else 1, dtype=torch.int64,
                                            device=x.device)
        self.sums[name][matrix] += (x * x).sum(0)
        if per_matrix_counts:
            self.counts[name][matrix] += x.shape[0]
        elif matrix == 0:
            self.counts[name][0] += x.shape[0]

    # ---- use ------------------------------------------------------------------------------------------
    def importance(self, name: str) -> torch.Tensor | None:
        """The float32 vector llama-quantize passes to ggml for this weight (flat, expert-major), or None."""
        if name not in self.sums:
            return None
        sums = self.sums[name].to(torch.float32).cpu().reshape(self.counts[name].numel(), -1)
        if self.legacy_ncall is not None:
            ncall = self.legacy_ncall[name]
            return (sums / ncall if ncall > 0 else sums).reshape(-1)
        counts = self.counts[name].to(torch.float32).cpu()[:, None]
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.ones_like(sums)).reshape(-1)

    def importances(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.sums:
            vector = self.importance(name)
            if not torch.isfinite(vector).all():
                raise QuantkitError(f"imatrix entry {name} has non-finite values; it cannot be used")
            out[name] = vector
        return out

    def expert_counts(self) -> dict[str, list[int]]:
        """Tokens per expert for MoE weights (counts with more than one entry)."""
        return {n: c.tolist() for n, c in self.counts.items() if c.numel() > 1}

    # ---- files ----------------------------------------------------------------------------------------
    def save(self, path: Path, fmt: str | None = None) -> Path:
        """GGUF (default, or for a .gguf name) or legacy .dat; written under a temporary name."""
        fmt = fmt or ("dat" if path.suffix == ".dat" else "gguf")
        names = sorted(n for n in self.sums if int(self.counts[n].sum()) > 0)
        if fmt == "gguf":
            metadata = {"general.type": string("imatrix"),
                        "imatrix.datasets": array(GGUFValueType.STRING, self.datasets),
                        "imatrix.chunk_count": u32(self.chunk_count), "imatrix.chunk_size": u32(self.chunk_size)}
            entries = []
            for n in names:
                n_counts = self.counts[n].numel()
                entries += [TensorEntry(f"{n}.in_sum2", (n_counts, self.sums[n].numel() // n_counts),
                                        GGMLQuantizationType.F32),
                            TensorEntry(f"{n}.counts", (n_counts, 1), GGMLQuantizationType.F32)]
            with GGUFWriter(path, metadata, entries) as writer:
                for n in names:
                    writer.write(f"{n}.in_sum2", self.sums[n].to(torch.float32).cpu().numpy())
                    writer.write(f"{n}.counts", self.counts[n].to(torch.float32).cpu().numpy())
                writer.finish()
            return path
        if fmt != "dat":
            raise QuantkitError(f"unknown imatrix format {fmt!r}; use gguf or dat")
        out = [struct.pack("<i", len(names))]
        for n in names:
            counts = self.counts[n].cpu()
            ncall = math.ceil(int(counts.max()) / max(self.chunk_size, 1))
            sums = self.sums[n].to(torch.float32).cpu().reshape(counts.numel(), -1)
            c = counts.to(torch.float32)[:, None]
            values = torch.where(c > 0, sums / c.clamp(min=1), torch.ones_like(sums)) * float(ncall)
            raw = n.encode()
            out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.numel()),
                    values.reshape(-1).numpy().astype("<f4").tobytes()]
        dataset = (self.datasets[-1] if self.datasets else "").encode()
        out += [struct.pack("<i", self.chunk_count), struct.pack("<i", len(dataset)), dataset]
        part = path.with_name(path.name + ".part")
        try:
            part.write_bytes(b"".join(out))
            part.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
            raise write_error(path, exc) from exc
        return path

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"{path}: no such imatrix file")
        with open(path, "rb") as f:
            magic = f.read(4)
        return cls._load_gguf(path) if magic == b"GGUF" else cls._load_dat(path)

    @classmethod
    def _load_gguf(cls, path: Path) -> Imatrix:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        fields = reader.fields
        missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in fields]
        if missing:
            raise SourceError(f"{path}: missing imatrix metadata {', '.join(missing)}; not an imatrix GGUF")
        tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
        im = cls(datasets=list(fields["imatrix.datasets"].contents()),
                 chunk_count=int(fields["imatrix.chunk_count"].contents()),
                 chunk_size=int(fields["imatrix.chunk_size"].contents()))
        for key, sums in tensors.items():
            if not key.endswith(".in_sum2"):
                continue
            name = key[: -len(".in_sum2")]
            if f"{name}.counts" not in tensors:
                raise SourceError(f"{path}: {name} has in_sum2 but no counts")
            counts = tensors[f"{name}.counts"].reshape(-1)
            im.sums[name] = torch.from_numpy(sums.reshape(counts.size, -1).astype(np.float64))
            im.counts[name] = torch.from_numpy(counts.astype(np.int64))
        return im

    @classmethod
    def _load_dat(cls, path: Path) -> Imatrix:
        raw = path.read_bytes()
        try:
            (n_entries,), pos = struct.unpack_from("<i", raw, 0), 4
            im = cls(legacy_ncall={})
            for _ in range(n_entries):
                (length,) = struct.unpack_from("<i", raw, pos)
                name = raw[pos + 4:pos + 4 + length].decode()
                pos += 4 + length
                ncall, nval = struct.unpack_from("<ii", raw, pos)
                pos += 8
                if nval < 1:
                    raise ValueError(f"entry {name} has {nval} values")
                values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos)
                pos += 4 * nval
                im.sums[name] = torch.from_numpy(values.astype(np.float64)).reshape(1, -1)
                im.counts[name] = torch.tensor([ncall])
                im.legacy_ncall[name] = ncall
            if pos + 8 <= len(raw):
                im.chunk_count, length = struct.unpack_from("<ii", raw, pos)
                im.datasets = [raw[pos + 8:pos + 8 + length].decode()]
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise SourceError(f"{path}: not a GGUF imatrix and not a readable legacy .dat imatrix ({exc})") from exc
        return im
