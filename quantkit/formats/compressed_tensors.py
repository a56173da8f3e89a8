"""The compressed-tensors output (llm-compressor's checkpoints; what vLLM and transformers' compressed-tensors
integration load; FORMATS.md §7): `--to ct:w4g128`, `ct:w8`, `ct:w4g128-gptq`, `ct:w4g128-awq`, ...

Spec: `w{bits}[g{group}][-asym][-gptq|-awq][-act][-mse]`.
- bits 4 or 8 (vLLM's WNA16 kernels); `g{group}` 32, 64 or 128 (strategy "group"), none = one scale per output
  row (strategy "channel", W8A16's preset);
- symmetric unless `-asym` (zero points stored);
- weights by round-to-nearest (the default, no calibration: compressed-tensors' own min-max grid), `-gptq`
  (quantkit.calib.gptq; `-act`: act-order with static groups, compressed-tensors' actorder "weight"; `-mse`: the
  MSE grid) or `-awq`
  (quantkit.calib.awq: grouped, always asymmetric; its scales folded into the norms, which are stored).

Every decoder-layer linear is stored pack-quantized (FORMATS.md §7.3): `weight_packed` int32 [out, in*bits/32]
(codes + 2^(bits-1) as unsigned, LSB first along the input dim), `weight_scale` [out, groups] in the model's
dtype (BF16), `weight_shape` int64 [2], asymmetric `weight_zero_point` int32 [out*bits/32, groups] (packed along
the output dim). A GPTQ or AWQ grid maps exactly onto compressed-tensors'
signed one: code q in 0..2^bits-1 is q - 2^(bits-1), zero point z is z - 2^(bits-1). The methods round their
scales to BF16 for the quantized forward, as the runtime does. Embeddings, lm_head, norms, routers: BF16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from quantkit.calib.awq import AWQ
from quantkit.calib.gptq import GPTQ
from quantkit.errors import ConfigError
from quantkit.formats import ConvertOptions, Target
from quantkit.formats.awq import FORMAT as AWQ_FORMAT
from quantkit.formats.layerwise_folder import (
    KEPT,
    KEPT_DTYPE,
    WEIGHT_SCHEME,
    LayerwiseFolderFormat,
    module_name,
    quantized_linears,
    runtime_sets,
)
from quantkit.formats.packing import pack, unpack
from quantkit.model import Model
from quantkit.quant.awq import AWQConfig, AWQResult
from quantkit.quant.gptq import GPTQConfig, GPTQResult, dequantize

SPEC_RE = re.compile(r"w(\d+)(?:g(\d+))?((?:-[a-z]+)*)")
BITS, GROUPS = (4, 8), (32, 64, 128)
FLAGS = ("asym", "gptq", "awq", "act", "mse")  # canonical order
GPTQ_ONLY = ("act", "mse")
GRAMMAR = ("w{bits}[g{group}][-asym][-gptq|-awq][-act][-mse] with bits 4 or 8, group 32, 64 or 128 (none: one "
           "scale per output row), e.g. w4g128, w8, w4g128-gptq, w4g128-awq; round-to-nearest unless -gptq or -awq; "
           "-act (act-order, static groups) and -mse only with -gptq; -awq is grouped and asymmetric")
# The compressed-tensors release whose checkpoint layout this follows (llm-compressor 0.14's)
CT_VERSION = "0.19.0"
LINEAR_TARGET = "Linear"


@dataclass(frozen=True)
class Scheme:
    """One weight scheme: the stored grid and the method that fills it."""

    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    method: str  # "rtn" | "gptq" | "awq"
    act: bool = False
    mse: bool = False
    damp: float | None = None

    @property
    def actorder(self) -> str | None:
        """compressed-tensors' actorder "weight": columns in act-order while quantizing, static natural groups, so
        nothing extra is stored. Its "group" (g_idx) is gone from compressed-tensors 0.20, which refuses it."""
        return "weight" if self.act else None

    def gptq(self) -> GPTQConfig:
        return GPTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.act,
                          static_groups=self.act, mse=self.mse, full_sym_range=True,
                          **({} if self.damp is None else {"damp_percent": self.damp}))

    def awq(self) -> AWQConfig:
        return AWQConfig(bits=self.bits, group_size=self.group_size)

    def weights_args(self) -> dict:
        """The config group's `weights` QuantizationArgs."""
        grouped = self.group_size != -1
        return {"num_bits": self.bits, "type": "int", "symmetric": self.sym,
                "group_size": self.group_size if grouped else None, "strategy": "group" if grouped else "channel",
                "block_structure": None, "dynamic": False, "actorder": self.actorder,
                "observer": "mse" if self.mse else "minmax", "observer_kwargs": {}}


def auto_method(spec: str) -> str:
    """`auto-4.00bpw` -> rtn, `auto-gptq-4.00bpw` and `auto-gptq-act-4.00bpw` -> gptq."""
    parts = spec.split("-")
    return parts[1] if len(parts) > 1 and parts[1] in ("rtn", "gptq") else "rtn"


def parse_scheme(spec: str) -> Scheme:
    match = SPEC_RE.fullmatch(spec.strip().lower())
    flags = tuple(match.group(3).split("-")[1:]) if match else ()
    bits = int(match.group(1)) if match else None
    group = -1 if match is None or match.group(2) is None else int(match.group(2))
    if (match is None or bits not in BITS or (group != -1 and group not in GROUPS)
            or any(f not in FLAGS for f in flags) or len(set(flags)) != len(flags)
            or ("gptq" in flags and "awq" in flags)
            or (any(f in flags for f in GPTQ_ONLY) and "gptq" not in flags)
            or ("awq" in flags and group == -1)):
        raise ConfigError(f"cannot read compressed-tensors spec {spec!r}: expected {GRAMMAR}")
    method = "gptq" if "gptq" in flags else "awq" if "awq" in flags else "rtn"
    return Scheme(bits, group, "asym" not in flags and method != "awq", method, "act" in flags, "mse" in flags)


def canonical_spec(scheme: Scheme) -> str:
    flags = {"asym": not scheme.sym and scheme.method != "awq", "gptq": scheme.method == "gptq",
             "awq": scheme.method == "awq", "act": scheme.act, "mse": scheme.mse}
    group = f"g{scheme.group_size}" if scheme.group_size != -1 else ""
    return f"w{scheme.bits}{group}" + "".join(f"-{f}" for f in FLAGS if flags[f])


# ---- packing (FORMATS.md §7.3): pure functions on int tensors ---------------------------------------------------
def _pack_padded(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """pack() after zero-padding `dim` to whole words, as compressed-tensors' pack_to_int32 does."""
    per = 32 // bits
    pad = -values.shape[dim] % per
    if pad:
        shape = list(values.shape)
        shape[dim] = pad
        values = torch.cat([values, values.new_zeros(shape)], dim)
    return pack(values, bits, dim)


def pack_result(result: GPTQResult | AWQResult, scheme: Scheme) -> dict[str, torch.Tensor]:
    """One linear's stored tensors by suffix. Unsigned codes 0..2^bits-1 are compressed-tensors' signed codes
    plus the 2^(bits-1) offset it packs with, so they pack as they are; likewise the zero points."""
    out, columns = result.q.shape
    stored = {"weight_packed": _pack_padded(result.q, scheme.bits, 1),
              "weight_scale": result.scales.to(KEPT_DTYPE).contiguous(),
              "weight_shape": torch.tensor([out, columns], dtype=torch.int64)}
    if not scheme.sym:
        stored["weight_zero_point"] = _pack_padded(result.zeros, scheme.bits, 0)
    width = columns if scheme.group_size == -1 else scheme.group_size
    if isinstance(result, GPTQResult) and not torch.equal(result.g_idx.long(), _natural_g_idx(columns, width)):
        raise RuntimeError("a GPTQ result has permuted groups, which this layout cannot store")
    return stored


def _natural_g_idx(columns: int, width: int) -> torch.Tensor:
    """Column -> group when groups are consecutive runs of `width` columns (no act-order permutation)."""
    return torch.arange(columns) // width


def dequantize_stored(stored: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The float32 [out, in] weight stored linear means: (code - zero point) x scale, with the stored scales;
    computed as the methods' runtime weights are, so a resumed run continues from the same numbers."""
    out, columns = (int(v) for v in stored["weight_shape"])
    q = unpack(stored["weight_packed"], bits, 1)[:, :columns].contiguous()
    scales = stored["weight_scale"].float()
    groups = scales.shape[1]
    if "weight_zero_point" in stored:
        zeros = unpack(stored["weight_zero_point"], bits, 0)[:out]
    else:
        zeros = torch.full((out, groups), 2 ** (bits - 1), dtype=torch.int32)
    g_idx = stored.get("weight_g_idx")
    if g_idx is None:
        g_idx = _natural_g_idx(columns, -(-columns // groups))
    return dequantize(q, scales, zeros, g_idx).contiguous()


def packed_bytes(shape: tuple[int, int], scheme: Scheme) -> int:
    out, columns = shape
    per = 32 // scheme.bits
    groups = 1 if scheme.group_size == -1 else columns // scheme.group_size
    total = 4 * out * -(-columns // per) + 2 * out * groups + 16  # weight_shape: two int64
    if not scheme.sym:
        total += 4 * -(-out // per) * groups
    return total


# ---- the format -------------------------------------------------------------------------------------------------
class CompressedTensorsFormat(LayerwiseFolderFormat):
    name = "ct"
    label = "CT"
    example = "w4g128"
    suffixes = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    # -act: GPTQ in act-order with static groups (actorder "weight"), llm-compressor's GPTQ default
    auto_specs = ("auto", "auto-gptq", "auto-gptq-act")
    # vLLM's WNA16 kernels: 4 or 8 bits
    AUTO_CANDIDATES = ("w4", "w4g128", "w4g64", "w4g32", "w8")

    def parse_spec(self, spec: str) -> Target:
        if spec.strip().lower() in self.auto_specs:  # convert names it after its budget (auto-gptq-4.00bpw)
            return Target(self.name, spec.strip().lower())
        return Target(self.name, canonical_spec(parse_scheme(spec)))

    def config(self, target: Target, options: ConvertOptions) -> Scheme:
        if self.is_auto(target):  # the method, sign and column order of every scheme it picks
            return Scheme(4, 128, True, auto_method(target.spec), act="-act" in target.spec, damp=options.damp)
        return replace(parse_scheme(target.spec), damp=options.damp)

    def is_rtn(self, target: Target) -> bool:
        return self.config(target, ConvertOptions()).method == "rtn"

    def gptq_config(self, scheme: Scheme) -> GPTQConfig:
        return scheme.gptq()

    def runtime_sets(self, model: Model) -> list[tuple[str, list[str]]]:
        # transformers (5.17, compressed-tensors 0.20) fuses experts into 3-D parameters and mis-loads experts whose
        # scheme differs across layers (measured: layer 2's experts at w8 among w4g128 ones gave logits 53% off;
        # w4g32 ones failed conversion), so one scheme for all of them
        return runtime_sets(model, experts_per_layer=False)

    def mix_label(self, scheme: Scheme | None) -> str:
        return KEPT if scheme is None else canonical_spec(replace(scheme, method="rtn", act=False, mse=False))

    def method(self, scheme: Scheme, rtn: bool, configs: dict[str, Scheme | None]) -> GPTQ | AWQ:
        if scheme.method == "awq":
            return AWQ(scheme.awq(), kept_dtype=KEPT_DTYPE, scale_dtype=KEPT_DTYPE,
                       configs={n: None if c is None else c.awq() for n, c in configs.items()})
        return GPTQ(scheme.gptq(), rtn=rtn, scale_dtype=KEPT_DTYPE, kept_dtype=KEPT_DTYPE,
                    configs={n: None if c is None else c.gptq() for n, c in configs.items()})

    def override_config(self, scheme: Scheme, text: str) -> Scheme | None:
        if text.lower() == KEPT:
            return None
        match = WEIGHT_SCHEME.fullmatch(text.lower())
        bits, group = int(match.group(1)), -1 if match.group(2) is None else int(match.group(2))
        if bits not in BITS or (group != -1 and group not in GROUPS):
            raise ConfigError(f"--tensor-type ...={text}: compressed-tensors schemes are w4 or w8 with group 32, 64 or "
                              "128 (or none: one scale per output row), optionally -asym; or bf16 to keep a tensor")
        if scheme.method == "awq":
            if group == -1:
                raise ConfigError(f"--tensor-type ...={text}: AWQ quantizes in groups; give a group size (e.g. "
                                  f"w{bits}g128) or bf16 to keep the tensor")
            return replace(scheme, bits=bits, group_size=group)  # AWQ's grid always has zero points
        return replace(scheme, bits=bits, group_size=group, sym=match.group(3) is None)

    def scheme_name(self, scheme: Scheme, target: Target) -> str:
        return canonical_spec(scheme)

    def check_model(self, model: Model, scheme: Scheme) -> None:
        if scheme.method == "awq":
            AWQ_FORMAT.check_model(model, AWQConfig(group_size=scheme.group_size))

    def check_shape(self, name: str, shape: tuple[int, int], scheme: Scheme) -> None:
        out, columns = shape
        if scheme.group_size != -1 and columns % scheme.group_size:
            raise ConfigError(f"{name!r} has shape {[out, columns]}; group {scheme.group_size} needs input columns "
                              "divisible by it (use another group size, or no g for one scale per output row)")

    def packed_bytes(self, shape: tuple[int, int], scheme: Scheme) -> int:
        return packed_bytes(shape, scheme)

    def pack(self, result: GPTQResult | AWQResult, scheme: Scheme) -> dict[str, torch.Tensor]:
        return pack_result(result, scheme)

    def unpack(self, stored: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
        return dequantize_stored(stored, scheme.bits)

    def config_files(self, scheme: Scheme, model: Model, configs: dict[str, Scheme | None]) -> tuple[dict, dict]:
        kept = [module_name(n) for n, c in configs.items() if c is None]
        return {"quantization_config": self.quantization_config(configs, ignored_linears(model) + kept)}, {}

    @staticmethod
    def quantization_config(configs: dict[str, Scheme | None], ignore: list[str]) -> dict:
        """config.json's quantization_config (FORMATS.md §7.1, §7.2), as compressed-tensors' update_config writes
        it: one config group targeting every Linear when the linears share a scheme; otherwise one per scheme,
        each targeting exactly its modules (disjoint regexes, so no matching precedence is involved)."""
        by_scheme: dict[Scheme, list[str]] = {}
        for name, scheme in configs.items():
            if scheme is not None:
                by_scheme.setdefault(scheme, []).append(module_name(name))
        # transformers (5.17) decompresses the fused routed experts with the first group whose `re:` targets
        # mention "experts" (shared_experts too): the routed experts' group goes first
        by_scheme = dict(sorted(by_scheme.items(), key=lambda item: not any(EXPERT.search(m) for m in item[1])))
        every = [module_name(n) for n in configs]
        groups = {}
        for i, (scheme, modules) in enumerate(by_scheme.items()):
            targets = [LINEAR_TARGET] if len(by_scheme) == 1 else module_targets(modules, every)
            groups[f"group_{i}"] = {"targets": targets, "weights": scheme.weights_args(), "input_activations": None,
                                    "output_activations": None, "format": "pack-quantized"}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}


LAYER_MODULE = re.compile(r"model\.layers\.(\d+)\.(.+)")
EXPERT = re.compile(r"experts\.\d+\.")


def module_targets(modules: list[str], every: list[str]) -> list[str]:
    r"""`re:` targets matching exactly `modules` among `every` module: per role, the layers it covers (routed
    experts folded into `experts.\d+` where all of a layer's experts are in), else the exact names."""
    by_role: dict[str, list[str]] = {}
    for module in modules:
        match = LAYER_MODULE.fullmatch(module)
        role = EXPERT.sub("experts.*.", match.group(2)) if match else module
        by_role.setdefault(role, []).append(module)
    targets = []
    for role, members in by_role.items():
        layers = sorted({int(m.group(1)) for n in members if (m := LAYER_MODULE.fullmatch(n))})
        rest = re.escape(role).replace(re.escape("experts.*."), r"experts\.\d+\.")
        pattern = rf"^model\.layers\.(?:{'|'.join(map(str, layers))})\.{rest}$"
        if layers and {n for n in every if re.match(pattern, n)} == set(members):
            targets.append(f"re:{pattern}")
        else:
            targets += [f"re:^{re.escape(n)}$" for n in sorted(members)]
    return targets


def ignored_linears(model: Model) -> list[str]:
    """The linear modules left unquantized, as compressed-tensors lists them: routers (2-D weights of a layer that
    are not quantized) and lm_head."""
    routers = [module_name(n) for _, _, others in quantized_linears(model) for n, shape in others.items()
               if len(shape) == 2 and n.endswith(".weight")]
    return routers + ["lm_head"]


FORMAT = CompressedTensorsFormat()
