"""Runs inside the GPTQModel consumer venv: make a peer's AWQ checkpoint (AutoAWQ's GEMM layout) of a bundled
model, to check the AWQ loaders and the reference dequantizer against something quantkit did not write.

    python awq_peer_quantize.py MODEL_DIR CALIB.json OUT_DIR

CALIB.json: a list of token-id lists. GPTQModel's AWQ defaults are zero_point false with bf16 scales (PEERS.md
§8); AutoAWQ's GEMM layout proper is zero_point true with fp16 scales, so this quantizes with sym=False and then
casts the saved scales to float16. GPTQModel's AWQ runs in bf16 only on CPU, so the scales it computes are bf16
values, which float16 holds exactly in this range (8 vs 11 significant bits; the cast is checked).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import AWQConfig

    model_dir, calib_path, out = sys.argv[1:]
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in json.loads(open(calib_path).read())]
    config = AWQConfig(bits=4, group_size=128, sym=False)
    model = GPTQModel.load(model_dir, config, dtype=torch.bfloat16, device="cpu")
    model.quantize(calib, batch_size=1)
    model.save(out)
    for shard in Path(out).glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith(".scales") and t.dtype != torch.float16:
                tensors[name] = t.to(torch.float16)
                if not torch.equal(tensors[name].to(t.dtype), t):
                    raise SystemExit(f"{name}: scales not exact in float16")
        save_file(tensors, shard, metadata={"format": "pt"})
    print(json.dumps(json.loads((Path(out) / "config.json").read_text())["quantization_config"]))


if __name__ == "__main__":
    main()
