"""What a checkpoint holds: architecture, parameter counts, dtypes, FP8 layout, quantizable weights; or, for a GGUF,
its types and bits per weight, per layer and in both accountings people compare by."""

from __future__ import annotations

import math
import re
from collections import Counter

from quantkit.arch import load_architecture
from quantkit.source import open_checkpoint


def inspect_checkpoint(path) -> dict:
    with open_checkpoint(path) as source:
        infos = source.tensors()
        dtypes: dict[str, dict[str, int]] = {}
        for t in infos:
            entry = dtypes.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += t.nbytes
        report = {
            "path": str(source.path),
            "files": len(source.files),
            "size_on_disk": source.size_on_disk(),
            "tensors": len(infos),
            "dtypes": dtypes,
            "fp8": {"detected": source.is_fp8,
                    "block_size": list(source.fp8_block) if source.is_fp8 else None},
        }
        if source.config is None:
            report["architecture"] = None
            report["parameters"] = {"total": sum(t.numel for t in infos)}
            return report

        arch = load_architecture(source.config, (t.name for t in infos), str(source.path))
        arch.check_tensors((t.name for t in infos), str(source.path))
        numel = {t.name: t.numel for t in infos}
        skipped = [t.name for t in infos if arch.is_skipped(t.name)]
        buffers = [t.name for t in infos if arch.is_buffer(t.name) and not arch.is_skipped(t.name)]
        total = sum(numel.values()) - sum(numel[n] for n in skipped) - sum(numel[n] for n in buffers)

        inactive = 0
        linears = []
        for layer in arch.layers():
            routed = sum(lin.numel for lin in layer.linears if lin.role.startswith("mlp.experts."))
            if layer.routed_experts:
                inactive += routed * (layer.routed_experts - layer.experts_per_token) // layer.routed_experts
            linears += layer.linears
        heads = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in numel]
        report.update({
            "architecture": arch.name,
            "hf_architectures": source.config.get("architectures"),
            "layers": arch.num_layers,
            "skipped_tensors": {"count": len(skipped), "parameters": sum(numel[n] for n in skipped),
                                "reason": "multi-token-prediction layers past num_hidden_layers"} if skipped else None,
            "parameters": {"total": total, "active": total - inactive},
            "quantizable": {
                "linear_weights": len(linears),
                "parameters": sum(lin.numel for lin in linears),
                "by_role": dict(Counter(lin.role for lin in linears)),
                "tensors": [{"name": lin.name, "role": lin.role, "shape": list(lin.shape),
                             "dtype": source.info(lin.name).dtype} for lin in linears],
            },
            "embeddings": heads,
        })
        return report


GGUF_HEAD = ("token_embd.weight", "output.weight")
_LAYER = re.compile(r"blk\.(\d+)\.")


def gguf_bits(tensors) -> dict:
    """Bits per weight of a GGUF tensor table, from (name, shape, bytes, type name) per tensor (a file's, or a plan's
    before it is written). `bpw.file` is llama.cpp's (tensor bytes x 8 over every element);
    `bpw.repeating_layers` leaves out token_embd and output (exllamav3's compare_q counts every `.weight` but those
    two, ik_llama.cpp prints "repeating layers" alike, and papers quote it), so a mix is comparable with EXL3's and
    the literature's bpw. `layers`: each decoder layer's bpw and types."""
    types: dict[str, dict[str, int]] = {}
    layers: dict[int, dict] = {}
    head: dict[str, dict] = {}
    repeating = [0, 0]  # bytes, elements
    elements = tensor_bytes = 0
    for name, shape, nbytes, type_name in tensors:
        n = math.prod(shape)
        elements += n
        tensor_bytes += nbytes
        entry = types.setdefault(type_name, {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += n
        entry["bytes"] += nbytes
        if name in GGUF_HEAD:
            head[name] = {"type": type_name, "bytes": nbytes, "elements": n, "bpw": 8 * nbytes / n}
        elif name.endswith(".weight"):
            repeating[0] += nbytes
            repeating[1] += n
        layer = _LAYER.match(name)
        if layer:
            record = layers.setdefault(int(layer[1]), {"bytes": 0, "elements": 0, "types": Counter()})
            record["bytes"] += nbytes
            record["elements"] += n
            record["types"][type_name] += 1
    return {
        "tensors": sum(v["tensors"] for v in types.values()), "parameters": elements, "tensor_bytes": tensor_bytes,
        "repeating_layers": {"bytes": repeating[0], "elements": repeating[1]},
        "bpw": {"file": 8 * tensor_bytes / elements if elements else None,  # a vocab-only GGUF has no tensors
                "repeating_layers": 8 * repeating[0] / repeating[1] if repeating[1] else None},
        "head": {name: head[name] for name in GGUF_HEAD if name in head},
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["elements"])),
        "layers": [{"layer": i, "bpw": 8 * r["bytes"] / r["elements"], "types": dict(r["types"].most_common())}
                   for i, r in sorted(layers.items())],
    }


def inspect_gguf(path) -> dict:
    """A GGUF's (or gguf-split set's) tensor types and bits per weight (gguf_bits), and how it was made:
    `quantize`, its quantize.* metadata (imatrix, GPTQ, gguf:auto's budget and predicted KLD)."""
    from quantkit.formats.gguf.mixtures import file_type_name
    from quantkit.source.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    ftype = gguf.metadata("general.file_type")
    return {
        "path": str(gguf.path), "format": "gguf", "files": len(gguf.paths), "size_on_disk": gguf.size_on_disk(),
        "architecture": gguf.metadata("general.architecture"), "name": gguf.metadata("general.name"),
        "file_type": file_type_name(ftype) or ftype,
        **gguf_bits((name, t.shape, t.nbytes, t.type.name) for name, t in gguf.tensors.items()),
        "quantize": {key.removeprefix("quantize."): gguf.metadata(key) for key in sorted(gguf.values)
                     if key.startswith("quantize.")},
    }
