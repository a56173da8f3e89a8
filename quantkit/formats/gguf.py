"""HF checkpoint (BF16/F16/F32 or FP8) -> GGUF files that llama.cpp loads, streamed one tensor at a time.

Each tensor is built from the checkpoint as the architecture describes it (renamed, Llama q/k rows
permuted, DeepSeek kv_b split into attn_k_b / attn_v_b, routed experts stacked), checked for NaN/Inf,
and encoded for every requested output from one read, piece by piece (an expert or a head at a time for
3-D tensors, bounded row chunks for big 2-D ones). Nothing larger than one source tensor is ever held, and
an FP8 checkpoint is dequantized block-row by block-row on read, never copied.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from gguf.constants import GGMLQuantizationType

from quantkit import __version__
from quantkit.arch.base import GGUFTensor
from quantkit.errors import QuantkitError
from quantkit.formats.gguf_file import GGUFWriter, TensorEntry, Value, read_header, string, u32
from quantkit.formats.gguf_tokenizer import tokenizer_metadata
from quantkit.model import Model
from quantkit.quant import get_codec

GGML_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION (ggml.h)
# Rows are encoded in chunks: on CPU ~1M elements, so the codecs' temporaries stay in cache and are reused by the
# allocator (64 MiB chunks made every temporary a fresh mmap: Q8_0 ran 4x slower); on a GPU larger chunks keep
# the kernels busy.
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


@dataclass
class GGUFOutput:
    """One GGUF file to write: where, its llama.cpp file type, and the ggml type of every tensor."""

    path: Path
    file_type: int  # LLAMA_FTYPE, written as general.file_type
    tensor_types: dict[str, str]  # GGUF tensor name -> ggml type name
    extra_metadata: dict[str, Value] = field(default_factory=dict)


def model_metadata(model: Model, file_type: int, name: str | None = None,
                   tokenizer_pre: str | None = None) -> dict[str, Value]:
    arch = model.arch
    meta: dict[str, Value] = {"general.architecture": string(arch.gguf_arch), "general.type": string("model"),
                              "general.name": string(name or model.source.path.name)}
    meta["general.quantization_version"] = u32(GGML_QUANTIZATION_VERSION)
    meta["general.file_type"] = u32(file_type)
    meta["general.quantized_by"] = string(f"quantkit {__version__}")
    meta.update(arch.gguf_hparams())
    folder = model.source.path if model.source.path.is_dir() else model.source.path.parent
    meta.update(tokenizer_metadata(folder, arch.vocab_size, arch.config, tokenizer_pre))
    return meta


def check_outputs(outputs: list[GGUFOutput], force: bool) -> None:
    paths = [o.path.resolve() for o in outputs]
    if len(set(paths)) != len(paths):
        raise QuantkitError("two outputs would be written to the same file; give each --to its own -o path")
    for out in outputs:
        if out.path.exists() and not force:
            raise QuantkitError(f"{out.path} already exists; pass --force to replace it (it is replaced only "
                                "once the new file is complete)")


def _importance_rows(importance: torch.Tensor | None, n_pieces: int, width: int, name: str):
    """Per-piece importance vectors: one row per expert / head, or one vector for a 2-D tensor."""
    if importance is None:
        return [None] * n_pieces
    rows = importance.reshape(-1, width)
    if rows.shape[0] == n_pieces:
        return list(rows)
    if rows.shape[0] == 1:
        return [rows[0]] * n_pieces
    raise QuantkitError(f"imatrix entry for {name} has {importance.numel()} values; expected {width} or "
                        f"{width} x {n_pieces} (one vector per expert)")


def convert(model: Model, outputs: list[GGUFOutput], *, importance: dict[str, torch.Tensor] | None = None,
            name: str | None = None, tokenizer_pre: str | None = None, split_max_bytes: int | None = None,
            force: bool = False, threads: int | None = None,
            progress: Callable[[str], None] | None = None) -> list[list[Path]]:
    """Write every output from one pass over the checkpoint; returns each output's file paths. `threads`:
    CPU encoding threads (default: torch's thread count)."""
    check_outputs(outputs, force)
    tensors = model.arch.gguf_tensors()
    importance = importance or {}
    writers = []
    with contextlib.ExitStack() as stack:
        for out in outputs:
            entries = [TensorEntry(t.name, t.shape, GGMLQuantizationType[out.tensor_types[t.name]]) for t in tensors]
            meta = model_metadata(model, out.file_type, name, tokenizer_pre)
            meta.update(out.extra_metadata)
            writers.append(stack.enter_context(GGUFWriter(out.path, meta, entries, split_max_bytes)))
        weights = model.weights()
        encoder = ChunkEncoder(threads)
        stack.callback(encoder.close)
        for tensor in tensors:
            if progress is not None:
                progress(tensor.name)
            _write_tensor(tensor, weights, outputs, writers, importance.get(tensor.name), encoder)
        paths = [w.finish() for w in writers]
    for out, files in zip(outputs, paths, strict=True):
        verify_gguf(files, [(t.name, t.shape, out.tensor_types[t.name]) for t in tensors])
    return paths


class ChunkEncoder:
    """Encodes row chunks in order. On CPU the chunks go to a pool of threads with one torch thread each, as
    ggml splits rows across its threads: torch's own intra-op threads meet at a barrier after every op, and a
    codec is hundreds of small ops per chunk, so with another process on a core Q4_K ran up to 90x slower."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def map(self, jobs: list[tuple[type, torch.Tensor, torch.Tensor | None]]):
        """Yields codec.encode(chunk, vector) for each (codec, chunk, vector), in order."""
        if self._pool is None or jobs[0][1].device.type != "cpu":
            return (codec.encode(chunk, vector) for codec, chunk, vector in jobs)
        return self._pool.map(_encode_single_threaded, jobs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _encode_single_threaded(job) -> torch.Tensor:
    torch.set_num_threads(1)  # per worker thread: the calling thread keeps its setting
    codec, chunk, vector = job
    return codec.encode(chunk, vector)


def _write_tensor(tensor: GGUFTensor, weights, outputs: list[GGUFOutput], writers: list[GGUFWriter],
                  importance: torch.Tensor | None, encoder: ChunkEncoder) -> None:
    width = tensor.shape[-1]
    n_pieces = tensor.shape[0] if len(tensor.shape) == 3 else 1
    vectors = _importance_rows(importance, n_pieces, width, tensor.name)
    codecs = [get_codec(out.tensor_types[tensor.name]) for out in outputs]
    for index, piece in enumerate(tensor.pieces(weights)):
        piece = piece.to(torch.float32)
        if not torch.isfinite(torch.stack(torch.aminmax(piece))).all():  # NaN propagates; 30x isfinite's speed
            bad = int((~torch.isfinite(piece)).sum())
            raise QuantkitError(f"tensor {tensor.name} has {bad} NaN/Inf value(s) (piece {index}); the checkpoint "
                                "is corrupt or was saved from a diverged run; nothing was written")
        rows_per_chunk = max(1, _CHUNK_ELEMENTS.get(piece.device.type, 1 << 20) // width)
        # every writer gets the chunks in row order; encode moves the vector to the chunk's device
        jobs = [(codec, piece[start:start + rows_per_chunk], vectors[index], writer)
                for start in range(0, piece.shape[0], rows_per_chunk)
                for codec, writer in zip(codecs, writers, strict=True)]
        for (_, _, _, writer), data in zip(jobs, encoder.map([job[:3] for job in jobs]), strict=True):
            writer.write(tensor.name, data.cpu().numpy())


def verify_gguf(paths: list[Path], expected: list[tuple[str, tuple[int, ...], str]]) -> None:
    """Re-open what was written and check its tensor table: names, shapes and types."""
    found = {}
    for path in paths:
        for t in read_header(path).tensors.values():
            found[t.name] = (t.shape, t.type.name)
    for tensor_name, shape, type_name in expected:
        if found.get(tensor_name) != (tuple(shape), type_name):
            raise QuantkitError(f"{paths[0]}: re-reading the written file found {tensor_name} as "
                                f"{found.get(tensor_name)}, expected {(tuple(shape), type_name)}")
    if len(found) != len(expected):
        raise QuantkitError(f"{paths[0]}: re-reading found {len(found)} tensors, expected {len(expected)}")


def parse_size(text: str) -> int:
    """gguf-split style sizes: 500M, 2G, 1.5G (powers of 1000, as gguf-split's --split-max-size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise QuantkitError(f"cannot read size {text!r}; use e.g. 500M or 2G")
    scale = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


# ---- GGUF -> GGUF (requantizing an F32/F16/BF16 GGUF, as llama-quantize does) --------------------------------
_REPLACED_KEYS = ("general.file_type", "general.quantization_version", "general.quantized_by", "split.")


def copied_metadata(source) -> dict[str, Value]:
    return {key: v for key, v in source.values.items() if not key.startswith(_REPLACED_KEYS)}


def requantize(source, outputs: list[GGUFOutput], *, importance: dict[str, torch.Tensor] | None = None,
               split_max_bytes: int | None = None, force: bool = False, device: str = "cpu",
               threads: int | None = None, progress: Callable[[str], None] | None = None) -> list[list[Path]]:
    """Re-encode the tensors of a GGUF file (a quantkit.source.gguf_file.GGUFFile) with new types; metadata
    is copied, general.file_type / quantization_version are set. Float inputs only (no requantizing of
    already-quantized data, as llama-quantize without --allow-requantize)."""
    check_outputs(outputs, force)
    names = list(source.tensors)
    quantized_inputs = [n for n in names if source.type_name(n) not in ("F32", "F16", "BF16")]
    if quantized_inputs:
        raise QuantkitError(f"{source.path}: tensor {quantized_inputs[0]} is already quantized "
                            f"({source.type_name(quantized_inputs[0])}); convert from the original checkpoint "
                            "or an F32/F16/BF16 GGUF")
    importance = importance or {}
    with contextlib.ExitStack() as stack:
        writers = []
        for out in outputs:
            entries = [TensorEntry(n, source.shape(n), GGMLQuantizationType[out.tensor_types[n]]) for n in names]
            meta = copied_metadata(source)
            meta.update({"general.quantization_version": u32(GGML_QUANTIZATION_VERSION),
                         "general.file_type": u32(out.file_type),
                         "general.quantized_by": string(f"quantkit {__version__}")})
            meta.update(out.extra_metadata)
            writers.append(stack.enter_context(GGUFWriter(out.path, meta, entries, split_max_bytes)))
        encoder = ChunkEncoder(threads)
        stack.callback(encoder.close)
        for name in names:
            if progress is not None:
                progress(name)
            shape = source.shape(name)

            def pieces(_weights, name=name, shape=shape):
                full = source.read(name, device=device)
                yield from (full if len(shape) == 3 else [full.reshape(-1, shape[-1])])

            _write_tensor(GGUFTensor(name, shape, pieces), None, outputs, writers, importance.get(name), encoder)
        paths = [w.finish() for w in writers]
    for out, files in zip(outputs, paths, strict=True):
        verify_gguf(files, [(n, source.shape(n), out.tensor_types[n]) for n in names])
    return paths
