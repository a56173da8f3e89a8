"""Layer-by-layer quantization of one model into several outputs in one pass (GPTQ, AWQ, round-to-nearest ...).

Each output is a Stream: a method (how one layer is quantized), a sink (takes each result as soon as it exists,
e.g. packs it), where it resumes (layers before `start_layer` were written by an earlier run: `restore(layer)`
gives their runtime weights, which only advance the stream's activations) and its stats. Every layer is read
once for all streams; each calibrated stream keeps its own activations (CalibrationRun.fork), so its next layer
sees its own quantized outputs. A stream changes tensors of the layer (a quantized linear's runtime weight, an
AWQ-scaled norm) through its LayerJob: in the shared layer cache when no later stream needs the float weights,
so a single output holds one layer of float32 weights at a time, else in an overlay of its own.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from quantkit.calib.engine import CalibrationRun, LayerWeights
from quantkit.errors import ConfigError
from quantkit.model import Model


class LayerJob:
    """One stream's work on one layer: the layer's tensors as this stream sees them, and its changes."""

    def __init__(self, model: Model, layer: int, stream: Stream, cache: LayerWeights, in_place: bool):
        self.arch, self.device, self.layer, self.stream = model.arch, model.device, layer, stream
        self._cache, self._in_place = cache, in_place
        self._changed: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        changed = self._changed.get(name)
        return changed if changed is not None else self._cache(name)

    def set(self, name: str, tensor: torch.Tensor) -> None:
        """From now on this stream's layer has `tensor` as `name`."""
        if self._in_place:
            self._cache.replace(name, tensor)
        else:
            self._changed[name] = tensor

    def emit(self, name: str, result: Any) -> None:
        self.stream.sink(self.layer, name, result)


class Method(Protocol):
    """How a stream quantizes one layer: hand every result to job.emit, set the runtime weights the stream
    propagates, and advance `run` (None when not `calibrated`) to the next layer."""

    calibrated: bool

    def quantize_layer(self, job: LayerJob, run: CalibrationRun | None) -> None: ...


@dataclass
class LayerStats:
    """What a stream's run did, layer by layer: for the end-of-run summary and the output's report."""

    seconds_per_layer: dict[int, float] = field(default_factory=dict)
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens per routed expert
    fallbacks: dict[int, list[str]] = field(default_factory=dict)  # experts calibrated by the fallback
    notes: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # layer -> kind -> name -> value

    def note(self, layer: int, kind: str, name: str, value: Any) -> None:
        """A method's fact about one tensor (e.g. "damping_raised": weight -> damping)."""
        self.notes.setdefault(layer, {}).setdefault(kind, {})[name] = value

    def noted(self, kind: str) -> dict[str, Any]:
        return {name: v for kinds in self.notes.values() for name, v in kinds.get(kind, {}).items()}

    def layer_record(self, layer: int) -> dict:
        """One layer's facts, JSON-ready and deterministic (no times): what a resumed run must carry over."""
        record = {"expert_tokens": self.expert_tokens.get(layer), "fallback_experts": self.fallbacks.get(layer),
                  **self.notes.get(layer, {})}
        return {k: v for k, v in record.items() if v}


@dataclass
class Stream:
    method: Method
    sink: Callable[[int, str, Any], None]
    start_layer: int = 0
    restore: Callable[[int], dict[str, torch.Tensor]] | None = None
    stats: LayerStats = field(default_factory=LayerStats)


def overlay(replaced: dict[str, torch.Tensor], weights: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`weights` with some tensors replaced."""
    return lambda name: replaced[name] if name in replaced else weights(name)


def run_layers(model: Model, streams: Sequence[Stream], samples: Sequence[torch.Tensor], *,
               progress: Callable[[int, int], None] | None = None) -> Iterator[int]:
    """Quantize every decoder layer for every stream; yields each layer once every stream's sink has had it
    (layers that every stream restores are yielded too). Peak memory: one layer's float32 weights, plus what
    streams other than the last keep beside them, plus each calibrated stream's activations."""
    for stream in streams:
        if stream.start_layer and stream.restore is None and stream.method.calibrated:
            raise ConfigError("resuming after layer 0 needs the finished layers' weights (restore)")
    arch = model.arch
    calibrated = [s for s in streams if s.method.calibrated]
    runs: dict[int, CalibrationRun] = {}
    if calibrated:
        first = CalibrationRun(arch, model.weights(), samples, model.device)
        runs = {id(s): first if i == 0 else first.fork() for i, s in enumerate(calibrated)}
    begin = 0 if calibrated else min((s.start_layer for s in streams), default=arch.num_layers)
    for layer in range(begin, arch.num_layers):
        cache = LayerWeights(model.weights())
        for stream in calibrated:
            if layer < stream.start_layer:
                run = runs[id(stream)]
                run.advance(run.forward(overlay(stream.restore(layer), cache)))
        # uncalibrated streams first: they only read the float weights that the calibrated ones may replace
        active = sorted((s for s in streams if layer >= s.start_layer), key=lambda s: s.method.calibrated)
        for i, stream in enumerate(active):
            job = LayerJob(model, layer, stream, cache, in_place=i == len(active) - 1)
            stream.method.quantize_layer(job, runs.get(id(stream)))
        cache.clear()
        _release_freed_memory()
        if progress is not None:
            progress(layer + 1, arch.num_layers)
        yield layer


def _release_freed_memory() -> None:
    """Hand the freed heap back to the OS after each layer. glibc keeps most of a layer's freed float32 tensors
    in its arenas (measured: with 653 MiB layers, RSS stayed about 2 GiB above what was alive, growing layer by
    layer), so without this the process's RSS grows with the model instead of staying at one layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
