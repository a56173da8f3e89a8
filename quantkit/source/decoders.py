"""Input decoders: how a checkpoint's stored tensors become the model's float tensors, chosen by what the folder
holds (config.json's `quantization_config.quant_method`, or FP8 tensors without one).

A decoder may hide stored companions of a tensor (FP8 block scales; GPTQ's qzeros/scales/g_idx as those
formats land) from the listing and read the tensor through them. New input formats register a class in
DECODERS; `HFCheckpoint` and everything above it (Model, eval) then read them unchanged.
"""

from __future__ import annotations

import json

import torch

from quantkit.errors import ConfigError, SourceError
from quantkit.source.fp8 import dequantize_blocks, expected_scale_shape
from quantkit.source.safetensors_file import FP8_DTYPES, SafetensorsFile

SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)


class Decoder:
    """Base: tensors stored as they are used (BF16/F16/F32)."""

    name = "dense"

    def __init__(self, location: dict[str, SafetensorsFile], config: dict | None, origin: str):
        self.location, self.config, self.origin = location, config or {}, origin

    def companions(self) -> dict[str, str]:
        """Model tensor -> the stored tensor it is read with (hidden from the listing)."""
        return {}

    def virtual(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Model tensors that are not stored under their own name -> (shape, the stored tensors they are built
        from, hidden from the listing)."""
        return {}

    def read(self, name: str, device) -> torch.Tensor | None:
        """The float32 tensor for `name` when this decoder builds it; None: read as stored."""
        return None

    def label(self, stored_dtypes: set[str]) -> str:
        return "/".join(sorted(stored_dtypes))


class BlockFP8Decoder(Decoder):
    """DeepSeek-V3/R1's FP8: e4m3 weights with a `weight_scale_inv` float32 scale per block (default 128x128)."""

    name = "fp8"

    def __init__(self, location, config, origin):
        super().__init__(location, config, origin)
        self.block = self._block_size()
        self._scales = self._pair_scales()

    def companions(self) -> dict[str, str]:
        return self._scales

    def read(self, name: str, device) -> torch.Tensor | None:
        scale_name = self._scales.get(name)
        if scale_name is None:
            return None
        weight = self.location[name].read(name, device=device, dtype=torch.float32)
        scale = self.location[scale_name].read(scale_name, device=device)
        return dequantize_blocks(weight, scale, self.block)

    def label(self, stored_dtypes: set[str]) -> str:
        fmt = (self.config.get("quantization_config") or {}).get("fmt") or "e4m3"
        return f"fp8 {fmt} block {self.block[0]}x{self.block[1]}"

    def _block_size(self) -> tuple[int, int]:
        block = (self.config.get("quantization_config") or {}).get("weight_block_size")
        if block is None:
            return DEFAULT_FP8_BLOCK
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise ConfigError(f"{self.origin}/config.json: quantization_config.weight_block_size must be two "
                              f"positive integers, got {block!r}")
        return (block[0], block[1])

    def _pair_scales(self) -> dict[str, str]:
        pairs = {}
        for name, file in self.location.items():
            dtype = file.entries[name].dtype
            if dtype not in FP8_DTYPES:
                continue
            scale_name = name + SCALE_SUFFIX
            if scale_name not in self.location:
                raise SourceError(f"{file.path}: FP8 weight {name!r} ({dtype}) has no {scale_name!r} block scale in "
                                  "the checkpoint; quantkit cannot dequantize it. Check the index lists every "
                                  "*_scale_inv tensor, or re-download the checkpoint")
            scale_entry = self.location[scale_name].entries[scale_name]
            weight_shape = file.entries[name].shape
            if len(weight_shape) != 2:
                raise SourceError(f"{file.path}: FP8 weight {name!r} has shape {list(weight_shape)}; block FP8 "
                                  "weights must be 2-D")
            expected = expected_scale_shape(weight_shape, self.block)
            if scale_entry.shape != expected:
                raise SourceError(f"{self.location[scale_name].path}: block scale {scale_name!r} has shape "
                                  f"{list(scale_entry.shape)} but weight {name!r} {list(weight_shape)} with "
                                  f"{self.block[0]}x{self.block[1]} blocks needs {list(expected)}; "
                                  "check quantization_config.weight_block_size in config.json")
            pairs[name] = scale_name
        return pairs


class _PackedDecoder(Decoder):
    """Checkpoints that store each quantized linear as `<module>.<suffix>` parts, read as a float32
    `<module>.weight` dequantized as the format's runtimes do."""

    kind = ""
    SUFFIXES: tuple[str, ...] = ()
    OPTIONAL: tuple[str, ...] = ()  # parts some modules store (then after the SUFFIXES, in this order)

    def _collect_modules(self, location) -> None:
        self._modules = {}
        for name in location:
            if name.endswith(f".{self.SUFFIXES[0]}"):
                module = name.removesuffix(f".{self.SUFFIXES[0]}")
                parts = tuple(f"{module}.{s}" for s in self.SUFFIXES)
                missing = [p for p in parts if p not in location]
                if missing:
                    raise SourceError(f"{location[name].path}: {self.kind} module {module!r} has no {missing[0]!r}; "
                                      "the checkpoint is incomplete, re-download or re-convert it")
                optional = tuple(p for s in self.OPTIONAL if (p := f"{module}.{s}") in location)
                self._modules[module + ".weight"] = parts + optional

    def _shape(self, parts: tuple[str, ...]) -> tuple[int, int]:
        raise NotImplementedError

    def _dequantize(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def virtual(self):
        return {weight: (self._shape(parts), parts) for weight, parts in self._modules.items()}

    def read(self, name: str, device) -> torch.Tensor | None:
        parts = self._modules.get(name)
        if parts is None:
            return None
        return self._dequantize([self.location[p].read(p, device=device) for p in parts])

    def _entry_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.location[name].entries[name].shape)


class GPTQDecoder(_PackedDecoder):
    """AutoGPTQ/GPTQModel checkpoints (FORMATS.md §5): `<module>.qweight/.qzeros/.scales/.g_idx`, dequantized as
    every GPTQ runtime does (quantkit.formats.gptq.dequantize_stored). A module's bits follow from its stored
    shapes, so mixes (GPTQModel's `dynamic`) read as they are."""

    name, kind = "gptq", "GPTQ"
    SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, location, config, origin):
        super().__init__(location, config, origin)
        qc = self.config["quantization_config"]
        self.bits, self.group_size = qc.get("bits"), qc.get("group_size", -1)
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        bits = {self.bits} | {o.get("bits", self.bits) for o in (qc.get("dynamic") or {}).values()}
        if not bits <= {2, 3, 4, 8} or fmt != "gptq":
            raise SourceError(f"{origin}/config.json: quantkit reads GPTQ checkpoints with bits 2/3/4/8 and "
                              f"checkpoint_format 'gptq' (v1 zeros); this one says bits {sorted(bits, key=str)!r}, "
                              f"format {fmt!r}")
        self._collect_modules(location)

    def _shape(self, parts):
        return self._entry_shape(parts[2])[1], self._entry_shape(parts[3])[0]

    def _dequantize(self, tensors):
        from quantkit.formats.gptq import dequantize_stored  # the format owns the packing (lazy: it imports Model)

        qweight, g_idx = tensors[0], tensors[3]
        return dequantize_stored(*tensors, qweight.shape[0] * 32 // g_idx.shape[0])

    def label(self, stored_dtypes: set[str]) -> str:
        qc = self.config["quantization_config"]
        group = f"g{self.group_size}" if self.group_size != -1 else ""
        flags = "".join(f for f, on in (("-act", qc.get("desc_act")), ("-asym", qc.get("sym") is False)) if on)
        mixed = []  # the schemes GPTQModel's `dynamic` sets besides the top-level one
        for pattern, o in (qc.get("dynamic") or {}).items():
            own_group = o.get("group_size", self.group_size)
            mixed.append("bf16" if pattern.startswith("-:") else f"w{o.get('bits', self.bits)}"
                         + (f"g{own_group}" if own_group != -1 else ""))
        return f"GPTQ w{self.bits}{group}{flags}" + "".join(f"+{m}" for m in dict.fromkeys(mixed))


class AWQDecoder(_PackedDecoder):
    """AutoAWQ GEMM checkpoints (FORMATS.md §6.1): `<module>.qweight/.qzeros/.scales`, dequantized as every AWQ
    runtime does (quantkit.formats.awq.dequantize_stored)."""

    name, kind = "awq", "AWQ"
    SUFFIXES = ("qweight", "qzeros", "scales")

    def __init__(self, location, config, origin):
        super().__init__(location, config, origin)
        qc = self.config["quantization_config"]
        self.bits = qc.get("bits", qc.get("w_bit"))
        self.group_size = qc.get("group_size", qc.get("q_group_size"))
        version = str(qc.get("version", "gemm")).lower()
        if self.bits != 4 or version != "gemm" or qc.get("zero_point", True) is not True:
            raise SourceError(f"{origin}/config.json: quantkit reads AWQ checkpoints in AutoAWQ's GEMM layout (4-bit, "
                              f"zero points); this one says bits {self.bits!r}, version {version!r}, zero_point "
                              f"{qc.get('zero_point')!r}")
        self._collect_modules(location)

    def _shape(self, parts):
        return self._entry_shape(parts[2])[1], self._entry_shape(parts[0])[0]

    def _dequantize(self, tensors):
        from quantkit.formats.awq import dequantize_stored  # the format owns the packing (lazy: it imports Model)

        return dequantize_stored(*tensors)

    def label(self, stored_dtypes: set[str]) -> str:
        return f"AWQ w4g{self.group_size}"


class CompressedTensorsDecoder(_PackedDecoder):
    """compressed-tensors pack-quantized checkpoints (FORMATS.md §7.3, llm-compressor's and quantkit's ct: output):
    `<module>.weight_packed/.weight_scale/.weight_shape` (+ `.weight_zero_point`, `.weight_g_idx`), dequantized
    as the runtimes do (quantkit.formats.compressed_tensors.dequantize_stored). Integer weight-only schemes."""

    name, kind = "compressed-tensors", "compressed-tensors"
    SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
    OPTIONAL = ("weight_zero_point", "weight_g_idx")

    def __init__(self, location, config, origin):
        super().__init__(location, config, origin)
        qc = self.config["quantization_config"]
        groups = (qc.get("config_groups") or {}).values()
        readable = qc.get("format") in ("pack-quantized", "mixed-precision") and all(
            g.get("format", "pack-quantized") == "pack-quantized" and not g.get("input_activations")
            and (g.get("weights") or {}).get("type") == "int" and (g.get("weights") or {}).get("num_bits") in (4, 8)
            for g in groups)
        if not groups or not readable:
            raise SourceError(f"{origin}/config.json: quantkit reads compressed-tensors checkpoints whose config "
                              "groups are all pack-quantized int4/int8 weight-only schemes; this one has format "
                              f"{qc.get('format')!r} and groups {json.dumps(qc.get('config_groups'))[:300]}")
        self._bits = sorted({g["weights"]["num_bits"] for g in groups})
        self._collect_modules(location)

    def _read_parts(self, parts: tuple[str, ...], device) -> dict[str, torch.Tensor]:
        return {p.rsplit(".", 1)[1]: self.location[p].read(p, device=device) for p in parts}

    def _shape(self, parts):
        out, columns = (int(v) for v in self.location[parts[2]].read(parts[2]))
        return out, columns

    def read(self, name: str, device) -> torch.Tensor | None:
        from quantkit.formats.compressed_tensors import dequantize_stored  # the format owns the packing

        parts = self._modules.get(name)
        if parts is None:
            return None
        stored = self._read_parts(parts, device)
        columns = int(stored["weight_shape"][1])
        bits = next((b for b in self._bits if stored["weight_packed"].shape[1] == -(-columns * b // 32)), None)
        if bits is None:
            raise SourceError(f"{self.origin}: {name!r} packs {columns} columns into {stored['weight_packed'].shape[1]}"
                              f" words, which fits none of the config's bit widths {self._bits}")
        return dequantize_stored(stored, bits)

    def label(self, stored_dtypes: set[str]) -> str:
        qc = self.config["quantization_config"]
        schemes = []
        for g in qc["config_groups"].values():
            w = g["weights"]
            group = f"g{w['group_size']}" if w.get("strategy") == "group" else ""
            schemes.append(f"w{w['num_bits']}{group}" + ("" if w.get("symmetric", True) else "-asym"))
        return "compressed-tensors " + "+".join(schemes)


# quantization_config.quant_method -> decoder; None: no quantization_config
DECODERS: dict[str | None, type[Decoder]] = {None: Decoder, "fp8": BlockFP8Decoder, "gptq": GPTQDecoder,
                                              "awq": AWQDecoder, "compressed-tensors": CompressedTensorsDecoder}


def decoder_for(location: dict[str, SafetensorsFile], config: dict | None, origin: str) -> Decoder:
    qc = (config or {}).get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method is None and any(f.entries[n].dtype in FP8_DTYPES for n, f in location.items()):
        method = "fp8"  # FP8 weights without a config (a lone .safetensors file): DeepSeek's layout
    if method not in DECODERS:
        readable = ", ".join(m for m in DECODERS if m) + " and unquantized BF16/F16/F32"
        raise SourceError(f"{origin}: config.json's quantization_config says quant_method {method!r}, which quantkit "
                          f"cannot read yet (it reads {readable}); give the original checkpoint")
    return DECODERS[method](location, config, origin)
