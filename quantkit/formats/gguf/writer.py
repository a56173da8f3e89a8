"""HF checkpoint (BF16/F16/F32 or FP8) -> GGUF files that llama.cpp loads, streamed one tensor at a time.

Each tensor is built from the checkpoint as the architecture describes it (renamed, Llama q/k rows
permuted, DeepSeek kv_b split into attn_k_b / attn_v_b, routed experts stacked), checked for NaN/Inf,
and encoded for every requested output from one read, piece by piece (an expert or a head at a time for
3-D tensors, bounded row chunks for big 2-D ones). Nothing larger than one source tensor is ever held, and
an FP8 checkpoint is dequantized block-row by block-row on read, never copied.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing
import re
import signal
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.gguf.file import GGUFWriter, TensorEntry, Value, read_header, string, u32, write_sparse
from quantkit.formats.gguf.mixtures import requires_imatrix
from quantkit.formats.gguf.tensors import GGUFTensor, mapping_for
from quantkit.formats.gguf.tokenizer import placeholder_tokenizer_metadata, tokenizer_metadata
from quantkit.model import Model
from quantkit.progress import Progress, ProgressCallback
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


def architecture_metadata(arch, file_type: int, name: str) -> dict[str, Value]:
    """general.* and the mapping's `{arch}.*` hyperparameters: every key of the file but the tokenizer's."""
    mapping = mapping_for(arch)
    meta: dict[str, Value] = {"general.architecture": string(mapping.gguf_arch), "general.type": string("model"),
                              "general.name": string(name)}
    meta["general.quantization_version"] = u32(GGML_QUANTIZATION_VERSION)
    meta["general.file_type"] = u32(file_type)
    meta["general.quantized_by"] = string(f"quantkit {__version__}")
    meta.update(mapping.hparams())
    return meta


def model_metadata(model: Model, file_type: int, name: str | None = None,
                   tokenizer_pre: str | None = None) -> dict[str, Value]:
    arch = model.arch
    meta = architecture_metadata(arch, file_type, name or model.source.path.name)
    folder = model.source.path if model.source.path.is_dir() else model.source.path.parent
    meta.update(tokenizer_metadata(folder, arch.vocab_size, arch.config, tokenizer_pre))
    return meta


# llama.cpp's pre-tokenizer of each GGUF architecture's catalog models (tokenizer.KNOWN_PRE)
_CATALOG_PRE = {"qwen2": "qwen2", "llama": "llama-bpe", "deepseek2": "deepseek-v3"}


def write_skeleton(path: Path, arch, plan, name: str = "skeleton") -> int:
    """The GGUF file `plan` (a GGUF Plan for `arch`, e.g. a catalog model's) would produce, with the data section
    a sparse hole: the real tensor table (the mapping's names and shapes at the plan's types, in convert's order)
    and metadata (general.*, the mapping's hyperparameters), with a placeholder tokenizer of vocab_size entries
    since a catalog model has no tokenizer files. llama.cpp loads it with mmap and allocates its KV cache and
    compute buffers as for the real file, without a weight on disk (bench/plan_fullscale.py,
    tests/plan/test_plan_llama_cpp.py). Returns the file's apparent size."""
    from quantkit.formats.gguf.mixtures import file_type

    mapping = mapping_for(arch)
    entries = [TensorEntry(t.name, t.shape, GGMLQuantizationType[plan.schemes[t.name]]) for t in mapping.tensors()]
    meta = architecture_metadata(arch, file_type(plan.target).ftype, name)
    meta.update(placeholder_tokenizer_metadata(arch.vocab_size, _CATALOG_PRE.get(mapping.gguf_arch, "default"),
                                               arch.config))
    return write_sparse(path, meta, entries)


def check_outputs(outputs: list[GGUFOutput], force: bool) -> None:
    paths = [o.path.resolve() for o in outputs]
    if len(set(paths)) != len(paths):
        raise QuantkitError("two outputs would be written to the same file; give each --to its own -o path")
    for out in outputs:
        if out.path.exists() and not force:
            raise QuantkitError(f"{out.path} already exists; pass --force to replace it (it is replaced only "
                                "once the new file is complete)")


def check_importance(outputs: list[GGUFOutput], importance: dict[str, torch.Tensor]) -> None:
    """llama-quantize refuses a very-low-bit tensor whose imatrix entry is missing ("the result will be
    garbage"); so does quantkit, before anything is written."""
    for out in outputs:
        for name, type_name in out.tensor_types.items():
            if name not in importance and requires_imatrix(name, type_name):
                raise QuantkitError(f"{out.path.name}: {name} would be {type_name}, which needs importance data, and "
                                    "the imatrix has no entry for it (collect one on this model with `quantkit "
                                    "imatrix` and pass it with --imatrix)")


def importance_rows(importance: torch.Tensor | None, n_pieces: int, width: int, name: str):
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
            force: bool = False, threads: int | None = None, progress: ProgressCallback | None = None,
            encoded: list | None = None) -> list[list[Path]]:
    """Write every output from one pass over the checkpoint; returns each output's file paths. `threads`:
    CPU encoding threads (default: torch's thread count). `progress`: stage "quantize", in weights (tensors
    differ in size by 1000x, so a count of tensors gives no ETA). `encoded`: per output, the tensors encoded
    before (a quantkit.formats.gguf.calibrated.Spool, copied as they are) or None."""
    check_outputs(outputs, force)
    tensors = mapping_for(model.arch).tensors()
    importance = importance or {}
    check_importance(outputs, importance)
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
        report = _quantize_progress(progress, [t.shape for t in tensors])
        spools = encoded or [None] * len(outputs)
        for tensor in tensors:
            report(tensor.shape)
            _write_tensor(tensor, weights, outputs, writers, importance.get(tensor.name), encoder, spools)
        encoder.flush()
        report(None)
        paths = [w.finish() for w in writers]
    for out, files in zip(outputs, paths, strict=True):
        verify_gguf(files, [(t.name, t.shape, out.tensor_types[t.name]) for t in tensors])
    return paths


class ChunkEncoder:
    """Encodes row chunks on `threads` CPU workers with one torch thread each, as ggml splits rows across its
    threads, and hands the results to their writers in submission order. torch's own intra-op threads meet at a
    barrier after every op, and a codec is hundreds of small ops per chunk, so with another process on a core
    Q4_K ran up to 90x slower.

    The scale-search codecs (k-quants, IQ4, imatrix-weighted legacy types) run in forked worker processes
    unless a tensor is a single chunk: their Python between ops holds the GIL, and two threads encoded Q4_K
    only 1.3x as fast as one (processes: 1.9x). The rest, a few large ops per chunk, run on threads, which need
    no copy. Up to two chunks per worker stay in flight, across tensor boundaries, so the workers keep busy
    while the next tensor is read."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()
        self._thread_pool: ThreadPoolExecutor | None = None
        self._process_pool: ProcessPoolExecutor | None = None
        self._pending: collections.deque = collections.deque()  # (writer, tensor name, future)

    def submit(self, codec, chunk: torch.Tensor, vector: torch.Tensor | None, writer: GGUFWriter, name: str,
               single: bool, piece: int = 0) -> None:
        """Queue codec.encode(chunk, vector) for writer; `single`: the tensor's only chunk in this run. The chunk
        may be in any float dtype (a GGUF's stored F16): it becomes float32, checked for NaN/Inf, on the worker."""
        if self.threads == 1 or chunk.device.type != "cpu":
            self.flush()
            writer.write(name, codec.encode(checked_float32(chunk, name, piece), vector).cpu().numpy())
            return
        if not single and codec.searches(vector) and _CAN_FORK:
            # by value through the pipe: torch's shared-memory tensors outlived their use and piled up
            chunk = checked_float32(chunk, name, piece)
            with _stop_signals_deferred():  # the first submit forks the workers
                future = self._processes().submit(_encode_in_process, codec, chunk.numpy(),
                                                  None if vector is None else vector.numpy())
        else:
            future = self._threads().submit(_encode_single_threaded, codec, chunk, vector, name, piece)
        self._pending.append((writer, name, future))
        while len(self._pending) > 2 * self.threads:
            self._write_oldest()

    def flush(self) -> None:
        while self._pending:
            self._write_oldest()

    def _write_oldest(self) -> None:
        writer, name, future = self._pending.popleft()
        data = future.result()
        writer.write(name, data.numpy() if isinstance(data, torch.Tensor) else data)

    def _processes(self) -> ProcessPoolExecutor:
        if self._process_pool is None:
            if self._thread_pool is not None:  # fork with no worker threads alive (they could hold locks)
                self._thread_pool.shutdown()
                self._thread_pool = None
            self._process_pool = ProcessPoolExecutor(self.threads, mp_context=multiprocessing.get_context("fork"),
                                                     initializer=_init_worker_process)
        return self._process_pool

    def _threads(self) -> ThreadPoolExecutor:
        if self._thread_pool is None:
            self._thread_pool = ThreadPoolExecutor(self.threads)
        return self._thread_pool

    def close(self) -> None:
        for pool in (self._thread_pool, self._process_pool):
            if pool is not None:
                pool.shutdown(cancel_futures=True)


_CAN_FORK = "fork" in multiprocessing.get_all_start_methods()


@contextlib.contextmanager
def _stop_signals_deferred():
    """Ctrl-C and SIGTERM only noted, then raised again at the end. Forking the pool's workers must not be cut
    short (a half-started pool is never shut down: its workers outlive the parent's exit), and a worker forked
    meanwhile inherits this harmless handler, not the parent's, until its initializer ignores both."""
    stops = (signal.SIGINT, signal.SIGTERM)
    # Python handlers are set from the main thread only, and one installed from C (None) could not be restored
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, stops):
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:
            signal.raise_signal(s)


def _init_worker_process() -> None:
    # Ctrl-C and SIGTERM (sent to the whole process group) are the parent's: it shuts the pool down, which ends
    # the workers, and removes the partial files
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def _encode_in_process(codec, chunk: np.ndarray, vector: np.ndarray | None) -> np.ndarray:
    return codec.encode(torch.from_numpy(chunk), None if vector is None else torch.from_numpy(vector)).numpy()


def _encode_single_threaded(codec, chunk: torch.Tensor, vector: torch.Tensor | None, name: str,
                            piece: int) -> torch.Tensor:
    torch.set_num_threads(1)  # per worker thread: the calling thread keeps its setting
    return codec.encode(checked_float32(chunk, name, piece), vector)


def checked_float32(chunk: torch.Tensor, name: str, piece: int) -> torch.Tensor:
    """The chunk in float32, refused if it holds NaN/Inf."""
    x = chunk.to(torch.float32)
    if not torch.isfinite(torch.stack(torch.aminmax(x))).all():  # NaN propagates; 30x isfinite's speed
        bad = int((~torch.isfinite(x)).sum())
        raise QuantkitError(f"tensor {name} has {bad} NaN/Inf value(s) (piece {piece}); the checkpoint is corrupt "
                            "or was saved from a diverged run; nothing was written")
    return x


def _quantize_progress(progress: ProgressCallback | None, shapes: list[tuple[int, ...]]):
    """report(shape) before each tensor, report(None) once all are written: "quantize" events in weights."""
    total = sum(math.prod(shape) for shape in shapes)
    done = 0

    def report(shape: tuple[int, ...] | None) -> None:
        nonlocal done
        if progress is not None:
            progress(Progress("quantize", total if shape is None else done, total, "weights"))
        if shape is not None:
            done += math.prod(shape)

    return report


def _write_tensor(tensor: GGUFTensor, weights, outputs: list[GGUFOutput], writers: list[GGUFWriter],
                  importance: torch.Tensor | None, encoder: ChunkEncoder, spools: list | None = None) -> None:
    ready = [None if spool is None else spool.pieces(tensor) for spool in spools or [None] * len(outputs)]
    if any(pieces is not None for pieces in ready):
        encoder.flush()  # a writer takes its tensors' data in order
        for pieces, writer in zip(ready, writers, strict=True):
            for index in range(len(pieces or {})):
                writer.write(tensor.name, pieces[index])
        outputs = [out for out, pieces in zip(outputs, ready, strict=True) if pieces is None]
        writers = [w for w, pieces in zip(writers, ready, strict=True) if pieces is None]
        if not outputs:
            return
    width = tensor.shape[-1]
    n_pieces = tensor.shape[0] if len(tensor.shape) == 3 else 1
    vectors = importance_rows(importance, n_pieces, width, tensor.name)
    codecs = [get_codec(out.tensor_types[tensor.name]) for out in outputs]
    for index, piece in enumerate(tensor.pieces(weights)):
        rows_per_chunk = max(1, _CHUNK_ELEMENTS.get(piece.device.type, 1 << 20) // width)
        starts = range(0, piece.shape[0], rows_per_chunk)
        single = len(starts) * n_pieces * len(codecs) == 1
        for start in starts:  # every writer gets the chunks in row order
            for codec, writer in zip(codecs, writers, strict=True):
                encoder.submit(codec, piece[start:start + rows_per_chunk], vectors[index], writer, tensor.name,
                               single, index)


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
               threads: int | None = None, progress: ProgressCallback | None = None) -> list[list[Path]]:
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
    check_importance(outputs, importance)
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
        report = _quantize_progress(progress, [source.shape(n) for n in names])
        for name in names:
            shape = source.shape(name)
            report(shape)

            def pieces(_weights, name=name, shape=shape):
                # on CPU F16/BF16 values as stored (a read-only view of the map): each chunk becomes a float32 copy
                # on its worker; F32 is copied here, so no codec can ever write into the map
                as_stored = torch.device(device).type == "cpu" and source.type_name(name) in ("F16", "BF16")
                full = source.stored(name) if as_stored else source.read(name, device=device)
                yield from (full if len(shape) == 3 else [full.reshape(-1, shape[-1])])

            _write_tensor(GGUFTensor(name, shape, pieces), None, outputs, writers, importance.get(name), encoder)
        encoder.flush()
        report(None)
        paths = [w.finish() for w in writers]
    for out, files in zip(outputs, paths, strict=True):
        verify_gguf(files, [(n, source.shape(n), out.tensor_types[n]) for n in names])
    return paths
