"""A stand-in for quantkit.calib.gptq (the calibration side of GPTQ) with its interface, for the format's tests
while the real one is not there: no calibration; each linear is round-to-nearest quantized, or, with act-order,
GPTQ-quantized against a synthetic Hessian (columns of seeded random importance) so g_idx is really permuted.

On a resumed run it asks `restore` for every finished layer and checks it against what it would have produced
(the weight a runtime computes, with fp16 scales): the real side propagates those weights to the next layer.
"""

from __future__ import annotations

import sys
import types
import zlib
from collections.abc import Callable, Iterator

import torch

from quantkit.quant.gptq import GPTQConfig, GPTQResult, dequantize, gptq_quantize, rtn_quantize


def quantize_linear(name: str, weight: torch.Tensor, config: GPTQConfig) -> GPTQResult:
    if not config.desc_act:
        return rtn_quantize(weight, config)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    columns = weight.shape[1]
    x = torch.randn(4 * columns, columns, generator=g) * torch.rand(columns, generator=g).exp2().mul(4).exp2()
    return gptq_quantize(weight, x.T @ x / x.shape[0], config)


def calibration_samples(model, options) -> list[torch.Tensor]:
    return []


def gptq_layers(model, config: GPTQConfig, samples: list[torch.Tensor], *, start_layer: int = 0,
                restore: Callable[[int], dict[str, torch.Tensor]] | None = None, stats=None,
                progress=None) -> Iterator[tuple[int, dict[str, GPTQResult]]]:
    specs = model.arch.layers()
    for spec in specs[:start_layer]:
        restored = restore(spec.index)
        for lin in spec.linears:
            r = quantize_linear(lin.name, model.source.read(lin.name), config)
            expected = dequantize(r.q, r.scales.half().float(), r.zeros, r.g_idx)
            if not torch.equal(restored[lin.name], expected):
                raise AssertionError(f"restore({spec.index}) gives another {lin.name} than the run that wrote it")
    for spec in specs[start_layer:]:
        yield spec.index, {lin.name: quantize_linear(lin.name, model.source.read(lin.name), config)
                           for lin in spec.linears}


def install() -> types.ModuleType:
    """quantkit.calib.gptq itself when it exists, else this stand-in registered under its name."""
    try:
        import quantkit.calib.gptq as real

        return real
    except ImportError:
        module = sys.modules[__name__]
        sys.modules["quantkit.calib.gptq"] = module
        return module
