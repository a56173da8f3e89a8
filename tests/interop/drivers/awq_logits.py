"""Runs inside a consumer venv, not with quantkit: load an AWQ (GEMM) folder with a real consumer and write its
logits on given token windows.

    python awq_logits.py LOADER MODEL_DIR WINDOWS.json OUT.pt [MODEL_DIR WINDOWS.json OUT.pt ...]

LOADER: "transformers" (GPTQModel env: AutoModelForCausalLM.from_pretrained, which hands AWQ to gptqmodel's
kernels; they take bfloat16 or float16 only, and on CPU bfloat16, PEERS.md §6) or "autoawq" (AutoAWQ env:
AutoAWQForCausalLM.from_quantized with PEERS.md §6's CPU workaround; it computes in float16). WINDOWS.json: a
list of token-id lists of one length. Each OUT.pt: {"logits": [float32 [T, vocab]], "kernels": sorted names of
the quantized linear classes the consumer chose, "versions": {...}}, or {"error": the loader's exception}. All
folders share one interpreter start (30-70 s of imports on a busy 2-core machine).
"""

import json
import sys

import torch


def load(loader: str, folder: str):
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16)
    if loader == "autoawq":
        import awq.models.base
        from awq import AutoAWQForCausalLM

        # Without the patch from_quantized sees a CPU and insists on IPEX, whose wheels pin another torch;
        # "cpu-naive" leaves WQLinear_GEMM on its torch dequantize-then-matmul path. accelerate rejects the
        # string "cpu" as a device_map. Its fused blocks (the default) assert on the CUDA-only awq_ext kernels.
        awq.models.base.get_best_device = lambda: "cpu-naive"
        return AutoAWQForCausalLM.from_quantized(folder, device_map={"": "cpu"}, fuse_layers=False).model
    raise SystemExit(f"unknown loader {loader!r}")


def run(loader: str, folder: str, windows: list[list[int]]) -> dict:
    try:
        model = load(loader, folder)
    except Exception as exc:  # reported to the test, which decides what is expected to load
        return {"error": f"{type(exc).__name__}: {exc}"}
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    # All windows (equal lengths) as one batch: both loaders' CPU kernels dequantize every linear on each call.
    with torch.inference_mode():
        logits = list(model(input_ids=torch.tensor(windows)).logits.float())
    return {"logits": logits, "kernels": kernels}


def versions(loader: str) -> dict:
    import transformers

    out = {"torch": str(torch.__version__), "transformers": transformers.__version__}
    if loader == "autoawq":
        import awq

        out["autoawq"] = awq.__version__
    else:
        import gptqmodel

        out["gptqmodel"] = gptqmodel.__version__
    return out


def main() -> None:
    loader, *triples = sys.argv[1:]
    for folder, windows, out in zip(triples[::3], triples[1::3], triples[2::3], strict=True):
        torch.save({**run(loader, folder, json.loads(open(windows).read())), "versions": versions(loader)}, out)


if __name__ == "__main__":
    main()
