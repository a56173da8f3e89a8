"""Runs inside the compressed-tensors consumer venv (tests/interop/envs/compressed_tensors.txt), not with quantkit.

    python ct_check.py logits MODEL_DIR WINDOWS.json OUT.pt [MODEL_DIR WINDOWS.json OUT.pt ...]
    python ct_check.py compress IN.pt OUT.pt [IN.pt OUT.pt ...]

logits: transformers' AutoModelForCausalLM.from_pretrained (its compressed-tensors integration, float32) on each
folder; OUT.pt = {"logits": [float32 [T, vocab]] per window, "quantized": sorted names of the modules it set up
as quantized, "versions": {...}} or {"error": the loader's exception}.
compress: IN.pt = [{"scheme": a config group (targets, weights, ...), "modules": {name: {"weight": float32 [out,
in], "weight_scale", "weight_zero_point" (signed, asymmetric only)}}}, ...]; compressed-tensors' own
PackedQuantizationCompressor.compress (what ModelCompressor.compress_model runs per module) on each module with
its group's scheme; OUT.pt = {name: its compressed state dict}. Several job files share one interpreter start.
"""

import json
import sys

import torch


def versions() -> dict:
    import compressed_tensors
    import transformers

    return {"torch": str(torch.__version__), "transformers": transformers.__version__,
            "compressed-tensors": compressed_tensors.__version__}


def logits(folder: str, windows: list[list[int]]) -> dict:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    except Exception as exc:  # reported to the test, which decides what is expected to load
        return {"error": f"{type(exc).__name__}: {exc}"}
    quantized = sorted(n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    with torch.inference_mode():
        out = [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in windows]
    return {"logits": out, "quantized": quantized, "versions": versions()}


def compress(groups: list[dict]) -> dict:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    out = {}
    for group in groups:
        scheme = QuantizationScheme.model_validate(group["scheme"])
        for name, tensors in group["modules"].items():
            out[name] = PackedQuantizationCompressor.compress(tensors, scheme)
    return out


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "logits":
        for folder, windows, out in zip(args[::3], args[1::3], args[2::3], strict=True):
            with open(windows) as f:
                torch.save(logits(folder, json.load(f)), out)
    elif mode == "compress":
        for job, out in zip(args[::2], args[1::2], strict=True):
            torch.save(compress(torch.load(job)), out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
