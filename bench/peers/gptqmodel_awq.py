"""Runs inside the GPTQModel venv (tests/interop/envs/gptqmodel.txt), not with quantkit: AWQ one model with
GPTQModel on given calibration token ids and save an AutoAWQ GEMM folder.

    python gptqmodel_awq.py SRC OUT CALIB.json GROUP

CALIB.json: a list of token-id lists (every tool gets the same ones). Settings pinned to quantkit's `awq:w4g{GROUP}`
(AutoAWQ's): 4-bit, asymmetric (sym=False: zero points, AutoAWQ's GEMM layout; GPTQModel's default writes
zero_point false), duo scaling, 20-point scale grid, clip search on (its AWQ processor's fixed defaults), no disk
offload, batch 1, calibration order kept. GPTQModel's AWQ runs in bf16 only on CPU (AwqTorchLinear rejects
float32); the saved bf16 scales are cast to float16, AutoAWQ's scale dtype, which holds them exactly here (the cast
is checked). Prints one JSON line of timings (imports, load, quantize, save).
"""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402


def fp16_scales(out: str) -> int:
    """Cast the saved bf16 scales to float16 in place; the count cast."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    cast = 0
    for shard in Path(out).glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith(".scales") and t.dtype != torch.float16:
                tensors[name] = t.to(torch.float16)
                if not torch.equal(tensors[name].to(t.dtype), t):
                    raise SystemExit(f"{name}: scales not exact in float16")
                cast += 1
        save_file(tensors, shard, metadata={"format": "pt"})
    return cast


def main() -> None:
    src, out, calib_path, group = sys.argv[1:]
    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import AWQConfig

    torch.set_num_threads(2)
    t_import = time.perf_counter()
    ids = json.loads(open(calib_path).read())
    calib = [{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids]
    config = AWQConfig(bits=4, group_size=int(group), sym=False, offload_to_disk=False)
    model = GPTQModel.load(src, config, device="cpu", dtype=torch.bfloat16)
    t_load = time.perf_counter()
    model.quantize(calib, batch_size=1, calibration_sort=None)
    t_quant = time.perf_counter()
    model.save(out)
    t_save = time.perf_counter()
    cast = fp16_scales(out)
    print(json.dumps({"import_s": t_import - T0, "load_s": t_load - t_import, "quantize_s": t_quant - t_load,
                      "save_s": t_save - t_quant, "scales_cast_fp16": cast,
                      "quantization_config": json.loads(open(f"{out}/config.json").read())["quantization_config"]}))


if __name__ == "__main__":
    main()
