"""The GPTQ output format (AutoGPTQ / GPTQModel checkpoints, FORMATS.md §5): `--to gptq:w4g128[-act][-asym]...`.

The output is an HF folder (quantkit.formats.safetensors_folder): every decoder-layer linear as
`<module>.qweight` int32 [in*bits/32, out], `.qzeros` int32 [G, out*bits/32] (v1: stored zero = true zero - 1,
`checkpoint_format: gptq`), `.scales` float16 [G, out] and `.g_idx` int32 [in]; embeddings, lm_head, norms,
routers and biases in BF16; `quantkit_report.json` says how it was made and lists each layer's calibration facts
(routed tokens per expert, fallbacks). Quantization itself is the calibration side's (quantkit.calib.gptq, run by
quantkit.calib.layerwise): this module packs each result as it comes, writes a shard per layer, and reads finished
layers back for a resumed run. Every gptq target of one command is a stream of one pass over the model.
"""

from __future__ import annotations

import re

import torch

from quantkit import __version__
from quantkit.calib.gptq import GPTQ
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Target
from quantkit.formats.layerwise_folder import LayerwiseFolderFormat
from quantkit.formats.packing import pack, to_int32, unpack
from quantkit.model import Model
from quantkit.quant.gptq import BITS, MSE_NORM, GPTQConfig, GPTQResult, dequantize

SPEC_RE = re.compile(r"w(\d+)(?:g(\d+))?((?:-[a-z]+)*)")
FLAGS = ("act", "asym", "static", "mse", "rtn")  # canonical order
GRAMMAR = ("w{bits}[g{group}][-act][-asym][-static][-mse][-rtn] with bits 2, 3, 4 or 8 and no g for one group "
           "per output row, e.g. w4g128, w4g128-act, w8, w4g32-asym; -rtn rounds to nearest without calibration "
           "(not with -act or -static)")
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


# ---- packing (FORMATS.md §5.2-5.3): pure functions on int tensors ---------------------------------------------
def _ones_words(length: int, bits: int, device) -> torch.Tensor:
    return pack(torch.ones(length, dtype=torch.int32, device=device), bits, 0).to(torch.int64)


def pack_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros [G, N*bits/32] from true zero points [N, G], v1: every field minus 1. For 2/4/8 bits done per word as
    GPTQModel's v2 -> v1 conversion does (subtract 0x11111111 for 4-bit, ...): for zeros >= 1 that is exactly
    "stored = zero - 1" field by field; an asymmetric true zero of 0 borrows from the next field, which GPTQModel's
    v1 -> v2 word addition undoes exactly, while a field-by-field reader sees a wrong zero (FORMATS.md §5.3: v1 is
    only safe for sym=True). 3-bit fields straddle words, where a word's borrow would be lost: each field is
    (zero - 1) mod 8, which GPTQModel reads back field by field."""
    if 32 % bits:
        return pack(((zeros - 1) & ((1 << bits) - 1)).T, bits, 1)
    words = pack(zeros.T, bits, 1).to(torch.int64)
    return to_int32(words - _ones_words(zeros.shape[0], bits, zeros.device))


def unpack_zeros_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points [N, G] from v1 qzeros [G, N*bits/32] (the inverse of pack_zeros_v1)."""
    if 32 % bits:
        return ((unpack(qzeros, bits, 1) + 1) & ((1 << bits) - 1)).T
    n = qzeros.shape[1] * 32 // bits
    return unpack(to_int32(qzeros.to(torch.int64) + _ones_words(n, bits, qzeros.device)), bits, 1).T


def pack_result(result: GPTQResult, bits: int) -> dict[str, torch.Tensor]:
    """One linear's stored tensors by suffix: qweight, qzeros, scales (float16), g_idx."""
    return {"qweight": pack(result.q.T, bits, 0), "qzeros": pack_zeros_v1(result.zeros, bits),
            "scales": result.scales.T.to(torch.float16).contiguous(), "g_idx": result.g_idx.to(torch.int32)}


def dequantize_stored(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """The float32 [out, in] weight a stored linear means: quantkit.quant.gptq.dequantize on the unpacked codes and
    zeros with the stored (fp16) scales, the weight every GPTQ runtime multiplies with."""
    q = unpack(qweight, bits, 0).T
    return dequantize(q, scales.float().T, unpack_zeros_v1(qzeros, bits), g_idx)


def packed_bytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    out, columns = shape
    groups = 1 if group_size == -1 else -(-columns // group_size)
    return 4 * columns * bits // 32 * out + 4 * groups * out * bits // 32 + 2 * groups * out + 4 * columns


# ---- the format -------------------------------------------------------------------------------------------------
def gptq_config(target: Target, damp: float | None = None) -> GPTQConfig:
    bits, group, flags = _parse(target.spec)
    return GPTQConfig(bits=bits, group_size=group, sym="asym" not in flags, desc_act="act" in flags,
                      static_groups="static" in flags, mse="mse" in flags,
                      **({} if damp is None else {"damp_percent": damp}))


def _parse(spec: str) -> tuple[int, int, tuple[str, ...]]:
    match = SPEC_RE.fullmatch(spec.strip().lower())
    flags = tuple(match.group(3).split("-")[1:]) if match else ()
    if (match is None or int(match.group(1)) not in BITS or (match.group(2) is not None and int(match.group(2)) <= 0)
            or any(f not in FLAGS for f in flags) or len(set(flags)) != len(flags)
            or ("rtn" in flags and ("act" in flags or "static" in flags))):
        raise ConfigError(f"cannot read GPTQ spec {spec!r}: expected {GRAMMAR}")
    group = -1 if match.group(2) is None else int(match.group(2))
    return int(match.group(1)), group, tuple(f for f in FLAGS if f in flags)


class GPTQFormat(LayerwiseFolderFormat):
    name = "gptq"
    label = "GPTQ"
    example = "w4g128"
    suffixes = SUFFIXES

    def parse_spec(self, spec: str) -> Target:
        if spec.strip().lower().startswith("auto"):
            raise ConfigError("gptq: folders hold one scheme for every linear (AutoGPTQ's quantize_config), so there "
                              "is no automatic mix to write there; --to ct:auto-gptq writes GPTQ-calibrated weights "
                              "with a scheme per layer group, which vLLM and transformers load")
        bits, group, flags = _parse(spec)
        return Target(self.name, f"w{bits}" + (f"g{group}" if group != -1 else "") + "".join(f"-{f}" for f in flags))

    def config(self, target: Target, options: ConvertOptions) -> GPTQConfig:
        return gptq_config(target, options.damp)

    def is_rtn(self, target: Target) -> bool:
        return "rtn" in _parse(target.spec)[2]

    def method(self, config: GPTQConfig, rtn: bool, configs: dict) -> GPTQ:
        return GPTQ(config, rtn=rtn)

    def check_shape(self, name: str, shape: tuple[int, int], config: GPTQConfig) -> None:
        out, columns = shape
        pf = 32 // config.bits if 32 % config.bits == 0 else 32
        if columns % pf or out % pf:
            raise ConfigError(f"{name!r} has shape {[out, columns]}; {config.bits}-bit GPTQ packing needs both sides "
                              f"divisible by {pf}")

    def packed_bytes(self, shape: tuple[int, int], config: GPTQConfig) -> int:
        return packed_bytes(shape, config.bits, config.group_size)

    def pack(self, result: GPTQResult, config: GPTQConfig) -> dict[str, torch.Tensor]:
        return pack_result(result, config.bits)

    def unpack(self, stored: dict[str, torch.Tensor], config: GPTQConfig) -> torch.Tensor:
        return dequantize_stored(*(stored[s] for s in SUFFIXES), config.bits)

    def config_files(self, config: GPTQConfig, model: Model, configs: dict) -> tuple[dict, dict[str, dict]]:
        return ({"quantization_config": self.quantization_config(config)},
                {"quantize_config.json": self.quantize_config(config)})

    @staticmethod
    def quantization_config(config: GPTQConfig) -> dict:
        """config.json's quantization_config (FORMATS.md §5.4: what transformers, GPTQModel and vLLM read)."""
        return {"quant_method": "gptq", "bits": config.bits, "group_size": config.group_size,
                "desc_act": config.desc_act, "sym": config.sym, "static_groups": config.static_groups,
                "damp_percent": config.damp_percent, "true_sequential": False, "lm_head": False,
                "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
                "meta": {"quantizer": [f"quantkit:{__version__}"], "damp_percent": config.damp_percent,
                         "static_groups": config.static_groups, "true_sequential": False,
                         "mse": MSE_NORM if config.mse else 0.0}}

    @staticmethod
    def quantize_config(config: GPTQConfig) -> dict:
        """AutoGPTQ's quantize_config.json (FORMATS.md §5.4, BaseQuantizeConfig.to_dict)."""
        return {"bits": config.bits, "group_size": config.group_size, "damp_percent": config.damp_percent,
                "desc_act": config.desc_act, "static_groups": config.static_groups, "sym": config.sym,
                "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
                "quant_method": "gptq", "checkpoint_format": "gptq"}


FORMAT = GPTQFormat()
