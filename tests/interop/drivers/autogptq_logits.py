"""Runs inside the AutoGPTQ consumer venv (tests/interop/envs/autogptq.txt), not with quantkit: load a GPTQ folder
with AutoGPTQ's own loader and write its logits on given token windows.

    python autogptq_logits.py WINDOWS.json MODEL_DIR OUT.pt [MODEL_DIR OUT.pt ...]

Loads with AutoGPTQForCausalLM.from_quantized on the CPU with every CUDA kernel off (PEERS.md §6), so AutoGPTQ picks
its torch QuantLinear. WINDOWS.json: a list of token-id lists. Each OUT.pt: {"logits": [float32 [T, vocab]],
"kernels": sorted module paths of the quantized linear classes, "versions": {...}}, or {"error": the loader's
exception} when that folder does not load. Several folders share one interpreter start.
"""

import json
import sys

import torch


def run(folder: str, windows: list[list[int]]) -> dict:
    from auto_gptq import AutoGPTQForCausalLM

    try:
        # float32: AutoGPTQ's default fp16 would add half-precision rounding on a CPU that gains nothing from it.
        model = AutoGPTQForCausalLM.from_quantized(folder, device="cpu", torch_dtype=torch.float32,
                                                   disable_exllama=True, disable_exllamav2=True, use_marlin=False,
                                                   use_triton=False)
    except Exception as exc:  # reported to the test, which decides what is expected to load
        return {"error": f"{type(exc).__name__}: {exc}"}
    kernels = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules() if hasattr(m, "qweight")})
    logits = []
    with torch.inference_mode():
        for ids in windows:
            logits.append(model(input_ids=torch.tensor([ids])).logits[0].float())
    return {"logits": logits, "kernels": kernels}


def main() -> None:
    import accelerate
    import auto_gptq
    import transformers

    windows_path, *pairs = sys.argv[1:]
    windows = json.loads(open(windows_path).read())
    # accelerate is unpinned and does AutoGPTQ's checkpoint loading (load_checkpoint_in_model).
    versions = {"torch": str(torch.__version__), "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "auto_gptq": auto_gptq.__version__}
    for folder, out in zip(pairs[::2], pairs[1::2], strict=True):
        torch.save({**run(folder, windows), "versions": versions}, out)


if __name__ == "__main__":
    main()
