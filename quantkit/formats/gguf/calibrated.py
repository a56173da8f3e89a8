"""`--to gguf:TYPE-gptq` and `gguf:auto-gptq`: GGUF files whose linears get GPTQ's error feedback inside ggml's
blocks (quantkit.quant.ggml_gptq), from a calibration pass run before the writer.

The pass is layerwise (quantkit.calib.layerwise, one decoder layer at a time, several outputs in one pass): every
linear whose GGUF tensor is made of its rows (GGUFTensor.per_source) is encoded from the Hessian of its inputs at
the type the output's plan gives it, and the layer's decoded weights give the next layer's inputs (GPTQ's
sequential mode); after the last layer, an untied head (output.weight) from the final norm's outputs. The rest is
left to the writer's usual encoding: the token embeddings (a lookup, tied heads included), norms and biases,
DeepSeek's k_b/v_b (llama.cpp applies them to other inputs than kv_b's) and float types.

Encoded rows are kept per layer under <output>.gptq.part/ (one file per layer, written whole, behind a key of
everything they depend on), and the writer copies them in place of encoding those tensors. A killed run resumes
after its last finished layer (their decoded weights restore the activations) and writes the same bytes; the
folder is removed once the file is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from quantkit.calib import layerwise
from quantkit.calib.cache import StatisticsCache
from quantkit.calib.data import calibration_samples, read_calibration
from quantkit.calib.engine import CalibrationRun
from quantkit.calib.gptq import HESSIANS, HessianLayers
from quantkit.calib.layerwise import LayerJob, Stream
from quantkit.formats.gguf.file import Value, f32, string, u32
from quantkit.formats.gguf.tensors import GGUFTensor, mapping_for
from quantkit.formats.gguf.writer import checked_float32, importance_rows
from quantkit.model import Model
from quantkit.progress import Progress
from quantkit.quant import get_codec
from quantkit.quant.ggml_gptq import DEFAULT_DAMP_PERCENT, ENCODING, gptq_encode
from quantkit.quant.gptq import HessianAccumulator

log = logging.getLogger(__name__)

_FLOAT_TYPES = {"F32", "F16", "BF16"}
HEAD, HEAD_SOURCE = "output.weight", "lm_head.weight"


def wants_gptq(spec: str) -> bool:
    """Whether a gguf target spec (Q4_K_M-gptq, auto-gptq-4.00bpw) asks for the calibrated encoding."""
    return "gptq" in spec.split("-")


class Spool:
    """One output's encoded rows, a file per decoder layer: {GGUF tensor name: {piece: uint8 [rows, bytes]}}, rows
    in the source's order (the writer applies the tensor's row_order); the head's in the last layer's file."""

    def __init__(self, folder: Path, key: str, n_layers: int):
        self.folder, self.key, self.n_layers = folder, key, n_layers
        stamp = folder / "key"
        if folder.is_dir() and (not stamp.is_file() or stamp.read_text() != key):
            log.info("%s: from another run (other model, plan or calibration); starting over", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key)
        self._loaded: tuple[int, dict] | None = None

    def _file(self, layer: int) -> Path:
        return self.folder / f"layer-{layer:05d}.npz"

    def has(self, layer: int) -> bool:
        return self._file(layer).is_file()

    def save(self, layer: int, encoded: dict[str, dict[int, np.ndarray]]) -> None:
        arrays = {f"{name}#{piece}": rows for name, pieces in encoded.items() for piece, rows in pieces.items()}
        part = self.folder / f"layer-{layer:05d}.tmp.npz"
        with open(part, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        part.replace(self._file(layer))

    def load(self, layer: int) -> dict[str, dict[int, np.ndarray]]:
        if self._loaded is None or self._loaded[0] != layer:
            encoded: dict[str, dict[int, np.ndarray]] = {}
            with np.load(self._file(layer)) as data:
                for key in data.files:
                    name, piece = key.rsplit("#", 1)
                    encoded.setdefault(name, {})[int(piece)] = data[key]
            self._loaded = (layer, encoded)
        return self._loaded[1]

    def pieces(self, tensor: GGUFTensor) -> dict[int, np.ndarray] | None:
        """The tensor's encoded pieces in GGUF row order, or None when the pass left it to the writer."""
        if tensor.name.startswith("blk."):
            layer = int(tensor.name.split(".")[1])
        elif tensor.name == HEAD:
            layer = self.n_layers - 1
        else:
            return None
        if not self.has(layer):
            return None
        pieces = self.load(layer).get(tensor.name)
        if pieces is None:
            return None
        if tensor.row_order is None:
            return pieces
        return {i: tensor.row_order(torch.from_numpy(rows)).numpy() for i, rows in pieces.items()}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def gptq_metadata(calib: Path | None, samples: int, ctx: int, damp: float | None) -> dict[str, Value]:
    """What a -gptq file's levels were chosen from (llama.cpp ignores keys it does not know, as it does
    llama-quantize's quantize.imatrix.* provenance)."""
    return {"quantize.gptq.dataset": string(str(calib) if calib else read_calibration(None)[1]),
            "quantize.gptq.samples": u32(samples), "quantize.gptq.ctx": u32(ctx),
            "quantize.gptq.damp_percent": f32(DEFAULT_DAMP_PERCENT if damp is None else damp)}


def spool_folder(path: Path) -> Path:
    return path.with_name(path.name + ".gptq.part")


class GGMLGPTQ(HessianLayers):
    """The layerwise method: each per-source linear encoded with ggml_gptq at its planned type. Emits (GGUF tensor
    name, (piece, encoded rows)). A linear no calibration token reached (an expert under min_expert_tokens with
    fallback "rtn") gets ggml's plain encoding, noted as "round_to_nearest"."""

    def __init__(self, mapping, types: dict[str, str], importance: dict[str, torch.Tensor], damp: float):
        super().__init__()
        self.types, self.importance, self.damp = types, importance, damp
        self.by_source = {source: (tensor, piece) for tensor in mapping.tensors() if tensor.per_source
                          for piece, source in enumerate(tensor.sources)}

    def quantize_layer(self, job: LayerJob, run: CalibrationRun | None) -> None:
        super().quantize_layer(job, run)
        if job.layer == job.arch.num_layers - 1 and HEAD_SOURCE in self.by_source:
            acc = HessianAccumulator(job.arch.hidden_size, job.device)
            for hidden in run.hidden:  # the last layer's quantized outputs, as the head will see them
                acc.add(job.arch.final_norm(job, hidden.to(job.device)))
            self.quantize(job, HEAD_SOURCE, job(HEAD_SOURCE), acc)

    def quantize(self, job: LayerJob, name: str, w: torch.Tensor, acc: HessianAccumulator | None) -> None:
        found = self.by_source.get(name)
        if found is None or self.types[found[0].name] in _FLOAT_TYPES:
            return
        tensor, piece = found
        w = checked_float32(w, tensor.name, piece)  # read here before the writer reads it
        codec = get_codec(self.types[tensor.name])
        n_pieces = tensor.shape[0] if len(tensor.shape) == 3 else 1
        vector = importance_rows(self.importance.get(tensor.name), n_pieces, tensor.shape[-1], tensor.name)[piece]
        if acc is None or acc.n == 0:
            job.stream.stats.note(job.layer, "round_to_nearest", name, "no calibration input")
        data = encode_linear(codec, w, acc, vector, self.damp)
        job.set(name, codec.decode(data, w.shape[1]))
        job.emit(tensor.name, (piece, data.cpu().numpy()))


def encode_linear(codec, w: torch.Tensor, acc: HessianAccumulator | None, importance: torch.Tensor | None,
                  damp: float) -> torch.Tensor:
    """A linear's rows as a -gptq file stores them: ggml_gptq from its Hessian, ggml's own encoding without one."""
    if acc is None or acc.n == 0:
        return codec.encode(w, importance)
    return gptq_encode(codec, w, acc.H, importance, damp)


def calibrate(model: Model, outputs: list[tuple[Path, dict[str, str]]], importance: dict[str, torch.Tensor],
              *, calib: Path | None, samples: int, ctx: int, damp: float | None,
              progress: Callable | None = None) -> list[Spool]:
    """Run the pass for every (output path, its plan's types) at once; returns their spools, complete."""
    mapping = mapping_for(model.arch)
    tokens = calibration_samples(model, calib, samples, ctx)
    damp = DEFAULT_DAMP_PERCENT if damp is None else damp
    digest = hashlib.sha256()
    for name in sorted(importance):
        digest.update(name.encode() + importance[name].float().cpu().numpy().tobytes())
    cache = StatisticsCache()
    spools, streams = [], []
    for path, types in outputs:
        key = cache.key(model, "gguf-gptq", torch.cat(tokens), types=json.dumps(types, sort_keys=True), damp=damp,
                        importance=digest.hexdigest(), encoding=ENCODING, hessians=HESSIANS)
        spool = Spool(spool_folder(path), key, model.arch.num_layers)
        start = next((i for i in range(model.arch.num_layers) if not spool.has(i)), model.arch.num_layers)
        collected: dict[int, dict[str, dict[int, np.ndarray]]] = {}

        def sink(layer: int, name: str, result, collected=collected) -> None:
            piece, rows = result
            collected.setdefault(layer, {}).setdefault(name, {})[piece] = rows

        spools.append(spool)
        streams.append((Stream(GGMLGPTQ(mapping, types, importance, damp), sink, start_layer=start,
                               restore=lambda layer, spool=spool, types=types: _restore(mapping, spool, types, layer,
                                                                                 model.device)),
                        collected))
    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(Progress("gptq calibration", done, total, "layers"))

    # layerwise.run_layers looked up per call: tests interpose on it
    for layer in layerwise.run_layers(model, [s for s, _ in streams], tokens, progress=report):
        for spool, (stream, collected) in zip(spools, streams, strict=True):
            if layer >= stream.start_layer:
                spool.save(layer, collected.pop(layer, {}))
    return spools


def _restore(mapping, spool: Spool, types: dict[str, str], layer: int, device) -> dict[str, torch.Tensor]:
    """A finished layer's decoded weights, by source name (what the pass had set)."""
    weights = {}
    tensors = {t.name: t for t in mapping.layer_tensors(layer)}
    if layer == spool.n_layers - 1:
        tensors.update((t.name, t) for t in mapping.tensors() if t.name == HEAD)
    for name, pieces in spool.load(layer).items():
        codec, tensor = get_codec(types[name]), tensors[name]
        for piece, rows in pieces.items():
            weights[tensor.sources[piece]] = codec.decode(torch.from_numpy(rows), tensor.shape[-1]).to(device)
    return weights
