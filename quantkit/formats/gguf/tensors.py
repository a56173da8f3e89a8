"""llama.cpp's view of an architecture: its GGUF tensors (names, shapes, how each is built from checkpoint
tensors and back), its `{arch}.*` hyperparameters, and which imatrix entries each calibration observation feeds.

One `GGUFMapping` subclass per llama.cpp architecture (quantkit/formats/gguf/llama.py, deepseek2.py), found by
`mapping_for(arch)`. Names and keys come from gguf-py's constants, so they follow llama.cpp's own tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

from quantkit.arch.base import Architecture, InputGroup, Weights
from quantkit.errors import SourceError, UnsupportedArchitectureError
from quantkit.formats.gguf.file import Value


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """llama.cpp's name of a tensor, e.g. (ATTN_Q, 3) -> blk.3.attn_q.weight."""
    base = TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor of the model's GGUF file, and how it maps to the checkpoint's tensors.

    `pieces(weights)` yields 2-D float32 pieces [rows, ne0] whose concatenation is the tensor in row-major
    order: the whole tensor for 1-D/2-D ones, one expert or head at a time for 3-D ones, so a stacked
    expert tensor never exists in memory at once and an importance vector applies per piece.
    `unpack(tensor)` is the inverse: the GGUF tensor (torch order) back to its `sources`, in order.

    `per_source`: piece i is source i's rows, reordered by `row_order` (a row permutation that applies to any
    [rows, ...] tensor, float weights or encoded rows alike; None: as they are). Such a tensor can be quantized
    from its sources' own calibration (quantkit.formats.gguf.calibrated)."""

    name: str
    shape: tuple[int, ...]  # torch order; ggml's ne is the reverse
    pieces: Callable[[Weights], Iterator[torch.Tensor]]
    sources: tuple[str, ...] = ()
    unpack: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
    per_source: bool = False
    row_order: Callable[[torch.Tensor], torch.Tensor] | None = None


def gguf_tensor(name: str, source: str, shape: tuple[int, ...],
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                inverse: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GGUFTensor:
    """A GGUF tensor that is one checkpoint tensor, optionally with its rows reordered (Llama's q/k rope pairs)."""

    def pieces(weights: Weights) -> Iterator[torch.Tensor]:
        w = weights(source)
        if transform is not None:
            w = transform(w)
        yield w.reshape(-1, shape[-1])

    def unpack(t: torch.Tensor) -> list[torch.Tensor]:
        return [inverse(t) if inverse is not None else t]

    return GGUFTensor(name, shape, pieces, (source,), unpack, per_source=True, row_order=transform)


def gguf_stacked(name: str, sources: list[str], shape: tuple[int, ...]) -> GGUFTensor:
    """A 3-D GGUF tensor stacked from 2-D checkpoint tensors (routed experts), one piece per source."""

    def pieces(weights: Weights) -> Iterator[torch.Tensor]:
        for source in sources:
            yield weights(source)

    return GGUFTensor(name, shape, pieces, tuple(sources), lambda t: list(t.unbind(0)), per_source=True)


@dataclass(frozen=True)
class ImatrixTarget:
    """An imatrix entry an observation accumulates into: matrix `matrix` of `matrices` (an expert or a head;
    None: the observation's own index), with one token count per matrix for MoE experts (llama.cpp's
    MUL_MAT_ID path) or one shared count (its MUL_MAT path)."""

    name: str
    matrix: int | None = 0
    matrices: int = 1
    per_matrix_counts: bool = False


class GGUFMapping:
    """Base class; subclasses set `gguf_arch` and `architectures` (quantkit architecture names) and
    implement hparams(), layer_tensors() and imatrix_targets()."""

    gguf_arch: str = ""
    architectures: tuple[str, ...] = ()

    def __init__(self, arch: Architecture):
        self.arch = arch

    def hparams(self) -> dict[str, Value]:
        """The `{arch}.*` metadata llama.cpp's loader reads for this architecture (llama-model.cpp)."""
        raise NotImplementedError

    def tensors(self) -> list[GGUFTensor]:
        """Every tensor of the GGUF file, in llama-quantize's order: non-block tensors first (by name), then
        each block's tensors by name (llama-model-loader.h `weight_name_comparer`)."""
        arch = self.arch
        h, vocab = arch.hidden_size, arch.vocab_size
        tensors = [gguf_tensor(tensor_name(MODEL_TENSOR.TOKEN_EMBD), "model.embed_tokens.weight", (vocab, h)),
                   gguf_tensor(tensor_name(MODEL_TENSOR.OUTPUT_NORM), "model.norm.weight", (h,))]
        if not arch.tie_word_embeddings:
            tensors.append(gguf_tensor(tensor_name(MODEL_TENSOR.OUTPUT), "lm_head.weight", (vocab, h)))
        tensors += self.extra_tensors()
        tensors.sort(key=lambda t: t.name)
        for index in range(arch.num_layers):
            tensors += sorted(self.layer_tensors(index), key=lambda t: t.name)
        return tensors

    def extra_tensors(self) -> list[GGUFTensor]:
        """Generated non-block tensors (e.g. llama3 rope_freqs)."""
        return []

    def layer_tensors(self, index: int) -> list[GGUFTensor]:
        raise NotImplementedError

    def imatrix_targets(self, group: InputGroup) -> list[ImatrixTarget]:
        """The imatrix entries an input group's observed input feeds (none for linears llama.cpp lacks)."""
        raise NotImplementedError

    def probe_targets(self, layer: int) -> dict[str, list[ImatrixTarget]]:
        """Imatrix entries fed by the forward's probes (runtime-specific activations), by probe key."""
        return {}

    def weights_from_gguf(self, read: Callable[[str], torch.Tensor]) -> Weights:
        """The checkpoint's tensors rebuilt from a GGUF file's (dequantized) tensors, for the forward:
        `read(gguf_name)` gives a float32 tensor in torch order."""
        origin = {}
        for tensor in self.tensors():
            for index, source in enumerate(tensor.sources):
                origin[source] = (tensor, index)
        cache: dict[str, list[torch.Tensor]] = {}

        def weights(name: str) -> torch.Tensor:
            if name not in origin:
                raise SourceError(f"the GGUF file has no tensor for {name}")
            tensor, index = origin[name]
            if tensor.name not in cache:
                if len(cache) >= 4:  # a layer's experts alternate between three stacked tensors
                    cache.pop(next(iter(cache)))
                cache[tensor.name] = tensor.unpack(read(tensor.name))
            return cache[tensor.name][index]

        return weights


def mapping_for(arch: Architecture) -> GGUFMapping:
    from quantkit.formats.gguf.deepseek2 import Deepseek2Mapping
    from quantkit.formats.gguf.llama import LlamaMapping, Qwen2Mapping

    for cls in (LlamaMapping, Qwen2Mapping, Deepseek2Mapping):
        if arch.name in cls.architectures:
            return cls(arch)
    raise UnsupportedArchitectureError(f"no llama.cpp mapping for the {arch.name} architecture")
