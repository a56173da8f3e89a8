"""The GPTQ output format (AutoGPTQ / GPTQModel checkpoints, FORMATS.md §5): `--to gptq:w4g128[-act][-asym]...`.

The output is an HF folder (quantkit.formats.safetensors_folder): every decoder-layer linear as
`<module>.qweight` int32 [in*bits/32, out], `.qzeros` int32 [G, out*bits/32] (v1: stored zero = true zero - 1,
`checkpoint_format: gptq`), `.scales` float16 [G, out] and `.g_idx` int32 [in]; embeddings, lm_head, norms,
routers and biases in BF16; `quantkit_report.json` says how it was made and lists each layer's calibration facts
(routed tokens per expert, fallbacks). Quantization itself is the calibration side's (quantkit.calib.gptq, run by
quantkit.calib.layerwise): this module packs each result as it comes, writes a shard per layer, and reads finished
layers back for a resumed run. Every gptq target of one command is a stream of one pass over the model.

Mixes (`--tensor-type`, `--to gptq:auto`) keep that layout per linear and say which linears differ from the
top-level scheme in GPTQModel's `dynamic` (FORMATS.md §5.4): one anchored pattern per set of linears the runtimes
run as one (it also names vLLM's fused module, qkv_proj, gate_up_proj, a layer's `experts`), `+:` with the
linear's bits, group_size, sym and desc_act, or `-:` for a linear kept in BF16. GPTQModel reads it (tests/interop);
vLLM's GPTQ configs read `dynamic` by the fused module's prefix, which the patterns name (not run here: no vLLM on
these machines); AutoGPTQ and transformers' GPTQ integration (optimum) ignore it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import torch

from quantkit import __version__
from quantkit.calib.gptq import GPTQ
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Target
from quantkit.formats.layerwise_folder import (
    KEPT,
    WEIGHT_SCHEME,
    LayerwiseFolderFormat,
    module_name,
    runtime_sets,
    runtime_units,
)
from quantkit.formats.packing import pack, to_int32, unpack
from quantkit.model import Model
from quantkit.quant.gptq import BITS, MSE_NORM, GPTQConfig, GPTQResult, dequantize

SPEC_RE = re.compile(r"w(\d+)(?:g(\d+))?((?:-[a-z]+)*)")
FLAGS = ("act", "asym", "static", "mse", "rtn")  # canonical order
GRAMMAR = ("w{bits}[g{group}][-act][-asym][-static][-mse][-rtn] with bits 2, 3, 4 or 8 and no g for one group "
           "per output row, e.g. w4g128, w4g128-act, w8, w4g32-asym; -rtn rounds to nearest without calibration "
           "(not with -act or -static); or auto with a budget (--target-bpw, --target-size, --fit-vram)")
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


def spec_of(config: GPTQConfig) -> str:
    """A linear's scheme as a spec (the flags a config holds; -rtn is the target's)."""
    flags = {"act": config.desc_act, "asym": not config.sym, "static": config.static_groups, "mse": config.mse}
    return (f"w{config.bits}" + (f"g{config.group_size}" if config.group_size != -1 else "")
            + "".join(f"-{f}" for f in FLAGS if flags.get(f)))


# ---- mixes as GPTQModel's `dynamic` -----------------------------------------------------------------------------
# what vLLM calls the linears it runs as one matmul (the prefix its `dynamic` lookup sees)
VLLM_FUSED = {("k_proj", "q_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj",
              ("kv_a_proj_with_mqa", "q_a_proj"): "fused_qkv_a_proj"}
EXPERT_MODULE = re.compile(r"(.+\.experts)\.\d+\.([^.]+)")


def unit_pattern(modules: list[str]) -> str:
    """An anchored regex matching exactly these modules (one linear, a fused set of one parent, or one layer's
    routed experts) under GPTQModel's names and vLLM's fused one."""
    if len(modules) == 1:
        return f"^{re.escape(modules[0])}$"
    experts = [EXPERT_MODULE.fullmatch(m) for m in modules]
    if all(experts) and len({e.group(1) for e in experts}) == 1:
        leaves = sorted({e.group(2) for e in experts})
        return rf"^{re.escape(experts[0].group(1))}(?:\.\d+\.(?:{'|'.join(map(re.escape, leaves))}))?$"
    parents = {m.rsplit(".", 1)[0] for m in modules}
    if len(parents) != 1:
        raise ValueError(f"no one pattern for {modules}")
    leaves = sorted(m.rsplit(".", 1)[1] for m in modules)
    fused = VLLM_FUSED.get(tuple(leaves))
    names = "|".join(map(re.escape, leaves + ([fused] if fused else [])))
    return rf"^{re.escape(parents.pop())}\.(?:{names})$"


def dynamic_entry(config: GPTQConfig) -> dict:
    return {"bits": config.bits, "group_size": config.group_size, "sym": config.sym, "desc_act": config.desc_act}


def dynamic_for(base: GPTQConfig, configs: dict[str, GPTQConfig | None],
                sets: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """GPTQModel's `dynamic` for every linear whose config is not `base`: `+:pattern` -> its settings, `-:pattern`
    -> kept unquantized. Linears of one runtime set share a config (check_mix) and one pattern."""
    dynamic = {}
    for members in runtime_units(configs, sets):
        config = configs[members[0]]
        if config == base:
            continue
        pattern = unit_pattern([module_name(n) for n in members])
        dynamic[("-:" if config is None else "+:") + pattern] = {} if config is None else dynamic_entry(config)
    return dynamic


def dynamic_override(dynamic: dict[str, dict] | None, module: str) -> dict | bool | None:
    """What `dynamic` says of a module, as GPTQModel reads it: the first pattern found in the name decides;
    False: kept unquantized; None: the top-level scheme."""
    for pattern, overrides in (dynamic or {}).items():
        negative = pattern.startswith("-:")
        if re.search(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, module):
            return False if negative else overrides
    return None


class GPTQFormat(LayerwiseFolderFormat):
    name = "gptq"
    label = "GPTQ"
    example = "w4g128"
    suffixes = SUFFIXES
    auto_specs = ("auto",)
    # GPTQModel's kernels take 2-8 bits (vLLM's Marlin 4 and 8; its gptq kernel 2/3/4/8)
    AUTO_CANDIDATES = ("w3g128", "w4", "w4g128", "w4g64", "w4g32", "w8")
    scale_dtype = torch.float16

    def parse_spec(self, spec: str) -> Target:
        if spec.strip().lower() in self.auto_specs:  # convert names it after its budget (auto-4.00bpw)
            return Target(self.name, spec.strip().lower())
        bits, group, flags = _parse(spec)
        return Target(self.name, f"w{bits}" + (f"g{group}" if group != -1 else "") + "".join(f"-{f}" for f in flags))

    def config(self, target: Target, options: ConvertOptions) -> GPTQConfig:
        if self.is_auto(target):  # what every scheme it picks shares: GPTQ, symmetric, natural order
            return gptq_config(Target(self.name, "w4g128"), options.damp)
        return gptq_config(target, options.damp)

    def is_rtn(self, target: Target) -> bool:
        return not self.is_auto(target) and "rtn" in _parse(target.spec)[2]

    def gptq_config(self, config: GPTQConfig) -> GPTQConfig:
        return config

    def method(self, config: GPTQConfig, rtn: bool, configs: dict) -> GPTQ:
        return GPTQ(config, rtn=rtn, configs=configs)

    def override_config(self, config: GPTQConfig, scheme: str) -> GPTQConfig | None:
        if scheme.lower() == KEPT:
            return None
        match = WEIGHT_SCHEME.fullmatch(scheme.lower())
        bits, group = int(match.group(1)), -1 if match.group(2) is None else int(match.group(2))
        if bits not in BITS or group == 0:
            raise ConfigError(f"--tensor-type ...={scheme}: GPTQ schemes are w2, w3, w4 or w8 with a group size (or "
                              "none: one scale per output row), optionally -asym; or bf16 to keep a tensor")
        return replace(config, bits=bits, group_size=group, sym=match.group(3) is None)

    def scheme_name(self, config: GPTQConfig, target: Target) -> str:
        return spec_of(config) + ("-rtn" if self.is_rtn(target) else "")

    def runtime_sets(self, model: Model) -> list[tuple[str, list[str]]]:
        return runtime_sets(model, experts_per_layer=True)

    def mix_label(self, config: GPTQConfig | None) -> str:
        return KEPT if config is None else spec_of(replace(config, desc_act=False, static_groups=False, mse=False))

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
        quantized = [c for c in configs.values() if c is not None]
        if quantized and config not in quantized:  # top level: the scheme most linears have
            config = Counter(quantized).most_common(1)[0][0]
        dynamic = dynamic_for(config, configs, self.runtime_sets(model))
        extra = {"dynamic": dynamic} if dynamic else {}
        return ({"quantization_config": self.quantization_config(config) | extra},
                {"quantize_config.json": self.quantize_config(config) | extra})

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
