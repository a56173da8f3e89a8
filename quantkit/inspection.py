"""What a checkpoint holds: architecture, parameter counts, dtypes, FP8 layout, quantizable weights."""

from __future__ import annotations

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
