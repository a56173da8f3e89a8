"""Calibration runs built on the engine: llama.cpp's importance matrix today."""

from __future__ import annotations

import logging

import torch

from quantkit.arch.base import Architecture, Weights
from quantkit.calib.cache import StatisticsCache
from quantkit.calib.data import chunks
from quantkit.calib.engine import Observer, calibrate
from quantkit.calib.imatrix import Imatrix
from quantkit.errors import ConfigError, SourceError
from quantkit.model import Model
from quantkit.progress import Progress, ProgressCallback

log = logging.getLogger(__name__)


class ImatrixObserver(Observer):
    """Accumulates llama.cpp's imatrix entries (GGUF tensor names) from the engine's input-group observations,
    through the architecture's llama.cpp mapping: one group's input feeds every GGUF weight that reads it
    (q/k/v; gate/up), a routed expert's group feeds its row of the stacked expert tensors, and the absorbed
    MLA probes feed attn_k_b / attn_v_b per head."""

    probes = True

    def __init__(self, imatrix: Imatrix):
        self.imatrix = imatrix
        self._targets: dict[str, list] = {}

    def begin_layer(self, arch: Architecture, layer: int) -> None:
        from quantkit.formats.gguf.tensors import mapping_for

        mapping = mapping_for(arch)
        self._targets = {g.key: mapping.imatrix_targets(g) for g in arch.layer_spec(layer).input_groups}
        self._targets.update(mapping.probe_targets(layer))

    def observe(self, layer: int, key: str, x: torch.Tensor, index: int, count: int) -> None:
        for t in self._targets.get(key, ()):
            matrix = index if t.matrix is None else t.matrix
            self.imatrix.add(t.name, x, matrix, count if t.matrix is None else t.matrices, t.per_matrix_counts)

    def end_layer(self, layer: int) -> None:
        # finite weights can still overflow float32 activations; such an entry would poison the file
        for name, sums in self.imatrix.sums.items():
            if name.startswith(f"blk.{layer}.") and not torch.isfinite(sums).all():
                raise SourceError(f"imatrix entry {name} became NaN/Inf in layer {layer}: the model's activations "
                                  "overflow on this text (the checkpoint is likely broken); nothing was written")


def collect_imatrix(model: Model, tokens: torch.Tensor, ctx: int = 512, max_chunks: int | None = None,
                    dataset: str = "", progress: ProgressCallback | None = None,
                    cache: StatisticsCache | None = None) -> Imatrix:
    """llama-imatrix's statistics from non-overlapping chunks of `ctx` tokens (a partial last chunk is
    dropped, as llama-imatrix does), each chunk starting with the model's BOS where it adds one."""
    n_chunks = len(tokens) // ctx
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise ConfigError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}; "
                          "give more text or a smaller --ctx")
    samples = chunks(model, tokens, ctx, n_chunks)
    key = None
    if cache is not None:
        key = cache.key(model, "imatrix", torch.stack(samples), dataset=dataset)
        cached = cache.load_imatrix(key)
        if cached is not None:
            log.info("imatrix statistics reused from %s", cache.path(key, ".imatrix.gguf"))
            return cached
    imatrix = Imatrix(datasets=[dataset], chunk_size=ctx)
    steps = model.arch.num_layers * n_chunks  # layer-major: a chunk is done only after the last layer
    if progress is not None:
        progress(Progress("imatrix", 0, steps, "chunk-layers"))
    calibrate(model.arch, _finite_weights(model.weights()), samples, [ImatrixObserver(imatrix)], device=model.device,
              progress=None if progress is None else lambda done, total: progress(
                  Progress("imatrix", done, total, "chunk-layers")))
    imatrix.chunk_count = n_chunks
    for name, counts in imatrix.expert_counts().items():
        unused = [e for e, c in enumerate(counts) if c == 0]
        if unused:
            log.warning("%s: experts %s received no calibration tokens; their importance is 1.0 (as llama.cpp "
                        "does), i.e. they are quantized as without an imatrix", name, unused)
    if cache is not None:
        cache.save_imatrix(key, imatrix)
    return imatrix


def _finite_weights(weights: Weights) -> Weights:
    """`weights` that refuse a tensor with NaN/Inf at its first read: statistics through it would be NaN, and
    llama-quantize would use them without a word."""
    checked: set[str] = set()

    def read(name: str) -> torch.Tensor:
        tensor = weights(name)
        if name not in checked:
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise SourceError(f"tensor {name} has {bad} NaN/Inf value(s); the checkpoint is corrupt or was "
                                  "saved from a diverged run; nothing was written")
            checked.add(name)
        return tensor

    return read
