"""Runs inside the GPTQModel consumer venv (tests/interop/envs/gptqmodel.txt), not with quantkit:
load a GPTQ folder with a real consumer and write its logits on given token windows.

    python gptq_logits.py LOADER WINDOWS.json MODEL_DIR OUT.pt [LOADER WINDOWS.json MODEL_DIR OUT.pt ...]

LOADER: "transformers" (AutoModelForCausalLM.from_pretrained; optimum + gptqmodel's CPU kernels) or "gptqmodel"
(GPTQModel.load(device="cpu") with its plain torch kernel, run in float32). WINDOWS.json: a list of token-id lists
of one length. Each OUT.pt: {"logits": [float32 [T, vocab]], "kernels": sorted names of the quantized linear
classes the consumer chose, "versions": {...}}, or {"error": the loader's exception} when that folder does not
load. Several folders (and loaders) share one interpreter start.
"""

import json
import sys

import torch


def load(loader: str, folder: str):
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        # GPTQModel's plain torch kernel (dequantize, then matmul in the input's dtype). Its load accepts only 16-bit
        # dtypes for it: float16 keeps the folder's fp16 scales exact, then the model runs in float32. Auto picks
        # TorchFusedLinear, which computes in bfloat16 through the CPU's own int4pack path: its logits moved with
        # the machine (6e-3 of max |logit| on AMD, 0.13 on a CI host where bfloat16 flipped an MoE routing choice).
        return GPTQModel.load(folder, device="cpu", dtype=torch.float16, backend=BACKEND.GPTQ_TORCH).float()
    raise SystemExit(f"unknown loader {loader!r}")


def run(loader: str, folder: str, windows: list[list[int]]) -> dict:
    try:
        model = load(loader, folder)
    except Exception as exc:  # reported to the test, which decides what is expected to load
        return {"error": f"{type(exc).__name__}: {exc}"}
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    # All windows (equal lengths) as one batch: the CPU kernels dequantize every linear on each call, which made
    # one call per window most of the driver's time; the logits are the same (measured identical).
    with torch.inference_mode():
        logits = list(model(input_ids=torch.tensor(windows)).logits.float())
    return {"logits": logits, "kernels": kernels}


def main() -> None:
    import gptqmodel
    import transformers

    args = sys.argv[1:]
    versions = {"torch": str(torch.__version__), "transformers": transformers.__version__,
                "gptqmodel": gptqmodel.__version__}
    for loader, windows_path, folder, out in zip(args[::4], args[1::4], args[2::4], args[3::4], strict=True):
        windows = json.loads(open(windows_path).read())
        torch.save({**run(loader, folder, windows), "versions": versions}, out)


if __name__ == "__main__":
    main()
