"""The calibration engine: calibration samples through the model one decoder layer at a time.

The hidden states of every sample entering layer i are kept (on the compute device, or in CPU memory when they
would not fit there); layer i's weights are read once, when the forward first asks for each (a MoE layer reads
only the experts some token reaches), and dropped when the layer is done; every sample runs through the layer
while the observers see each input group's input (keyed by the architecture's InputGroup.key, see
quantkit.arch.base); then a layer hook may replace the layer's outputs (a quantizer propagating its quantized
outputs, GPTQ's sequential mode) before they become layer i+1's inputs. Peak memory: one layer's weights plus
the activations, whatever the model's size.

Samples run one at a time with batch 1, exactly as a whole-model forward per sample would: statistics equal
those of quantkit's (and llama.cpp's) per-chunk forward.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence

import torch

from quantkit.arch.base import Architecture, Weights
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)


class Observer:
    """Base class of what calibration collects. `probes`: also wants the forward's runtime-specific probe
    activations (e.g. llama.cpp's absorbed MLA inputs), which cost extra compute."""

    probes = False

    def begin_layer(self, arch: Architecture, layer: int) -> None:
        """Called before layer `layer` runs its first sample."""

    def observe(self, layer: int, key: str, x: torch.Tensor, index: int, count: int) -> None:
        """`x` [tokens, in] is input group `key`'s input (or a probe's activation, head `index` of `count`)."""

    def end_layer(self, layer: int) -> None:
        """Called once every sample has run through layer `layer`."""


class Routing:
    """Routing decisions of every sample of one layer (set as the architecture's on_route hook): the chosen
    experts and the weights their outputs are summed with."""

    def __init__(self):
        self.indices: list[torch.Tensor] = []
        self.gates: list[torch.Tensor] = []

    def __call__(self, layer: int, indices: torch.Tensor, gates: torch.Tensor) -> None:
        self.indices.append(indices)
        self.gates.append(gates)


# layer_hook(layer, layer weights, inputs, outputs) -> replacement outputs (same shapes) or None
LayerHook = Callable[[int, Weights, list[torch.Tensor], list[torch.Tensor]], "list[torch.Tensor] | None"]


class LayerWeights:
    """One layer's weights, each read from the source once, on first use, and kept until `clear()`."""

    def __init__(self, read: Weights):
        self._read = read
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self._cache.get(name)
        if tensor is None:
            tensor = self._cache[name] = self._read(name)
        return tensor

    def replace(self, name: str, tensor: torch.Tensor) -> None:
        """From now on `name` is `tensor` (a quantizer's runtime weight in place of the float one it no longer
        needs), so the layer never holds both."""
        self._cache[name] = tensor

    def clear(self) -> None:
        self._cache.clear()


def _store_device(device: torch.device, n_values: int) -> torch.device:
    """Where the hidden states live: the compute device when they take at most half its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 4 * n_values <= free // 2 else torch.device("cpu")


class CalibrationRun:
    """The hidden states of every sample at the current layer, advanced one layer at a time (`step`)."""

    def __init__(self, arch: Architecture, weights: Weights, samples: Sequence[torch.Tensor],
                 device: torch.device | str = "cpu"):
        if not samples:
            raise QuantkitError("calibration needs at least one sample")
        self.arch, self.weights, self.device = arch, weights, torch.device(device)
        self.store = _store_device(self.device, sum(len(s) for s in samples) * arch.hidden_size)
        embed = LayerWeights(weights)
        with torch.no_grad():
            self.hidden = [arch.embed(embed, s.to(self.device)[None]).to(self.store) for s in samples]
        self.layer = 0

    def fork(self) -> CalibrationRun:
        """A second run from the same hidden states (shared, not copied: a run replaces them, never edits them),
        for another output that propagates its own quantized activations."""
        twin = copy.copy(self)
        twin.hidden = list(self.hidden)
        return twin

    @torch.no_grad()
    def forward(self, layer_weights: Weights, observers: Sequence[Observer] = (),
                on_sample: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """Every sample through the current layer with `layer_weights`, observed; returns the outputs."""
        arch, layer = self.arch, self.layer
        if observers:
            def dispatch(key: str, x: torch.Tensor, index: int, count: int) -> None:
                for o in observers:
                    o.observe(layer, key, x, index, count)

            arch.observe = dispatch
            arch.observe_probes = any(o.probes for o in observers)
        try:
            outputs = []
            for h in self.hidden:
                positions = torch.arange(h.shape[1], device=self.device)
                outputs.append(arch.layer_forward(layer, layer_weights, h.to(self.device), positions).to(self.store))
                if on_sample is not None:
                    on_sample()
            return outputs
        finally:
            arch.observe, arch.observe_probes = None, False

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The given outputs of the current layer become the next layer's inputs."""
        self.hidden = outputs
        self.layer += 1


@torch.no_grad()
def calibrate(arch: Architecture, weights: Weights, samples: Sequence[torch.Tensor], observers: Sequence[Observer],
              *, device: torch.device | str = "cpu", layer_hook: LayerHook | None = None,
              progress: Callable[[int, int], None] | None = None) -> None:
    """Run `samples` (1-D token id tensors, each one forward's worth) through every decoder layer, feeding
    `observers`. `progress(done, total)` counts (layer, sample) steps."""
    run = CalibrationRun(arch, weights, samples, device)
    total, done = arch.num_layers * len(samples), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    for layer in range(arch.num_layers):
        for o in observers:
            o.begin_layer(arch, layer)
        layer_weights = LayerWeights(weights)
        outputs = run.forward(layer_weights, observers, step)
        if layer_hook is not None:
            replaced = layer_hook(layer, layer_weights, run.hidden, outputs)
            outputs = replaced if replaced is not None else outputs
        layer_weights.clear()
        for o in observers:
            o.end_layer(layer)
        run.advance(outputs)
