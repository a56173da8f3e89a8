"""Runs inside the AutoAWQ venv (tests/interop/envs/autoawq.txt: autoawq 0.2.9, transformers 4.51.3), not with
quantkit: AWQ one model with AutoAWQ on given calibration token ids and save its GEMM folder.

    python autoawq_awq.py SRC OUT CALIB.json GROUP

AutoAWQ's defaults, which quantkit's `awq:w4g{GROUP}` follows: 4-bit, zero_point True, GEMM, duo_scaling True, the
20-point scale grid, apply_clip True, max_chunk_memory 1 GiB. The token-id lists go in as calib_data (AutoAWQ takes
list[list[int]] as pre-tokenized; every sample is max_calib_seq_len long, so its concatenate-and-split gives back
the same samples), all of them (max_calib_samples = their count) in one batch (n_parallel_calib_samples None).
The model is loaded in float32 (quantkit's compute dtype; AutoAWQ otherwise takes the config's bf16, slow and
coarse on CPU); the saved scales are float16 as always. The source's tokenizer files are copied beside the output
(untimed) so the folder evaluates like the others. Prints one JSON line of timings (imports, load, quantize, save).
"""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402


def main() -> None:
    src, out, calib_path, group = sys.argv[1:]
    from awq import AutoAWQForCausalLM

    torch.set_num_threads(2)
    t_import = time.perf_counter()
    ids = json.loads(open(calib_path).read())
    model = AutoAWQForCausalLM.from_pretrained(src, torch_dtype=torch.float32, device_map={"": "cpu"})
    t_load = time.perf_counter()
    config = {"zero_point": True, "q_group_size": int(group), "w_bit": 4, "version": "GEMM"}
    model.quantize(None, config, calib_data=ids, duo_scaling=True, apply_clip=True, max_calib_samples=len(ids),
                   max_calib_seq_len=len(ids[0]), n_parallel_calib_samples=None, max_chunk_memory=1024 ** 3)
    t_quant = time.perf_counter()
    model.save_quantized(out)
    t_save = time.perf_counter()

    import shutil
    from pathlib import Path

    for f in Path(src).iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, Path(out) / f.name)
    print(json.dumps({"import_s": t_import - T0, "load_s": t_load - t_import, "quantize_s": t_quant - t_load,
                      "save_s": t_save - t_quant, "quant_config": config}))


if __name__ == "__main__":
    main()
