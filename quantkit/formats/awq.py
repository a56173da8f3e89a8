"""The AWQ output format (AutoAWQ's GEMM checkpoints, FORMATS.md §6): `--to awq:w4g128[-rtn]`.

The output is an HF folder (quantkit.formats.layerwise_folder): every decoder-layer linear as `<module>.qweight`
int32 [in, out/8] and `.qzeros` int32 [in/g, out/8] (4-bit codes packed along the output dim in AWQ's interleaved
order: nibble i of a word holds column 8c + ORDER[i]; zeros stored as they are) and `.scales` float16 [in/g, out];
the norms and routers carry the folded AWQ scales; everything unquantized is BF16. config.json's
`quantization_config` is AutoAWQ's {quant_method: awq, version: gemm, zero_point: true, bits, group_size,
modules_to_not_convert}. AWQ itself is quantkit.calib.awq on the layerwise pass.
"""

from __future__ import annotations

import re

import torch

from quantkit.arch.base import Architecture
from quantkit.calib.awq import AWQ, scaling_units
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Target
from quantkit.formats.layerwise_folder import KEPT_DTYPE, LayerwiseFolderFormat
from quantkit.formats.packing import pack, unpack
from quantkit.model import Model
from quantkit.quant.awq import GROUP_SIZES, AWQConfig, AWQResult, dequantize

SPEC_RE = re.compile(r"w4g(\d+)(-rtn)?")
GRAMMAR = ("w4g{group}[-rtn] with group 32, 64 or 128 (AWQ's GEMM layout is 4-bit with zero points), e.g. "
           "w4g128; -rtn quantizes without AWQ's scales and clipping (no calibration)")
SUFFIXES = ("qweight", "qzeros", "scales")
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column ORDER[i] of its 8
REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _parse(spec: str) -> tuple[int, bool]:
    match = SPEC_RE.fullmatch(spec.strip().lower())
    if match is None or int(match.group(1)) not in GROUP_SIZES:
        raise ConfigError(f"cannot read AWQ spec {spec!r}: expected {GRAMMAR}")
    return int(match.group(1)), match.group(2) is not None


# ---- packing (FORMATS.md §6.1): pure functions on int tensors ---------------------------------------------
def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes [rows, cols] -> int32 [rows, cols/8] in AWQ's interleaved order."""
    rows, cols = values.shape
    return pack(values.reshape(rows, cols // 8, 8)[..., list(ORDER)].reshape(rows, cols), 4, 1)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    rows = words.shape[0]
    return unpack(words, 4, 1).reshape(rows, -1, 8)[..., list(REVERSE_ORDER)].reshape(rows, -1)


def pack_result(result: AWQResult) -> dict[str, torch.Tensor]:
    return {"qweight": pack_awq(result.q.T), "qzeros": pack_awq(result.zeros.T),
            "scales": result.scales.T.contiguous().half()}


def dequantize_stored(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 [out, in] weight a runtime computes: (q - z) * s per group of input columns."""
    group_size = qweight.shape[0] // scales.shape[0]
    # contiguous, as the runtime weight the quantized run propagated: matmul rounding depends on the layout
    return dequantize(unpack_awq(qweight).T.contiguous(), scales.float().T.contiguous(), unpack_awq(qzeros).T,
                      group_size)


class AWQFormat(LayerwiseFolderFormat):
    name = "awq"
    label = "AWQ"
    example = "w4g128"
    suffixes = SUFFIXES

    def parse_spec(self, spec: str) -> Target:
        group, rtn = _parse(spec)
        return Target(self.name, f"w4g{group}" + ("-rtn" if rtn else ""))

    def config(self, target: Target, options: ConvertOptions) -> AWQConfig:
        return AWQConfig(group_size=_parse(target.spec)[0])

    def is_rtn(self, target: Target) -> bool:
        return _parse(target.spec)[1]

    def method(self, config: AWQConfig, rtn: bool, configs: dict) -> AWQ:
        return AWQ(config, rtn=rtn, kept_dtype=KEPT_DTYPE)

    def check_model(self, model: Model, config: AWQConfig) -> None:
        arch = model.arch
        if type(arch).norm_block is Architecture.norm_block:
            raise ConfigError(f"{model.source.path}: quantkit does not know how AWQ's scales fold into "
                              f"{arch.name}'s norms (no norm_block for its attention/MLP); use gptq: or gguf: for "
                              "this model")
        for spec in arch.layers():
            shapes = spec.tensor_shapes()
            for unit in scaling_units(spec.input_groups):
                shape = shapes.get(unit.producer)
                if unit.kind == "norm" and (shape is None or len(shape) != 1):
                    raise ConfigError(f"{model.source.path}: {unit.producer!r} is not a plain norm weight AWQ's "
                                      "scales can fold into; use gptq: or gguf: for this model")

    def check_shape(self, name: str, shape: tuple[int, int], config: AWQConfig) -> None:
        out, columns = shape
        if out % 8 or columns % config.group_size:
            raise ConfigError(f"{name!r} has shape {[out, columns]}; AWQ's GEMM layout needs output rows divisible "
                              f"by 8 and input columns by the group size {config.group_size}")

    def packed_bytes(self, shape: tuple[int, int], config: AWQConfig) -> int:
        out, columns = shape
        groups = columns // config.group_size
        return 4 * columns * out // 8 + 4 * groups * out // 8 + 2 * groups * out

    def pack(self, result: AWQResult, config: AWQConfig) -> dict[str, torch.Tensor]:
        return pack_result(result)

    def unpack(self, stored: dict[str, torch.Tensor], config: AWQConfig) -> torch.Tensor:
        return dequantize_stored(*(stored[s] for s in SUFFIXES))

    def config_files(self, config: AWQConfig, model: Model, configs: dict) -> tuple[dict, dict[str, dict]]:
        return {"quantization_config": self.quantization_config(config)}, {}

    @staticmethod
    def quantization_config(config: AWQConfig) -> dict:
        """config.json's quantization_config (FORMATS.md §6.3: what transformers, AutoAWQ and vLLM read)."""
        return {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": config.bits,
                "group_size": config.group_size, "modules_to_not_convert": None}


FORMAT = AWQFormat()
