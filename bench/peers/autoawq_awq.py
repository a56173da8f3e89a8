"""Runs inside the AutoAWQ venv (tests/interop/envs/autoawq.txt: autoawq 0.2.9, transformers 4.51.3), not with
quantkit: AWQ one model with AutoAWQ on given calibration token ids and save its GEMM folder.

    python autoawq_awq.py SRC OUT CALIB.json GROUP [--as-is]

AutoAWQ's defaults, which quantkit's `awq:w4g{GROUP}` follows: 4-bit, zero_point True, GEMM, duo_scaling True, the
20-point scale grid, apply_clip True, max_chunk_memory 1 GiB. The token-id lists go in as calib_data (AutoAWQ takes
list[list[int]] as pre-tokenized; every sample is max_calib_seq_len long, so its concatenate-and-split gives back
the same samples), all of them (max_calib_samples = their count) in one batch (n_parallel_calib_samples None).
The model is loaded in float32 (quantkit's compute dtype; AutoAWQ otherwise takes the config's bf16, slow and
coarse on CPU); the saved scales are float16 as always. The source's tokenizer files are copied beside the output
(untimed) so the folder evaluates like the others. A CPU-only aliasing bug in AutoAWQ's scale search is patched
(fix_cpu_alias; --as-is runs AutoAWQ unpatched). Prints one JSON line of timings (imports, load, quantize, save).
"""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402


def fix_cpu_alias() -> None:
    """AutoAWQ's scale search snapshots the inspected module with `{k: v.cpu() for k, v in state_dict()}` and then
    scales the linears' weights in place: on a GPU .cpu() copies, on CPU it returns the same tensor, so the
    snapshot is scaled too. Every later grid point is then judged on W * s(ratio 0), and the restore leaves the
    weights multiplied by s(ratio 0) while the norm/linear before them is divided only by the chosen scales: the
    folded model no longer computes the source's function (KLD 4-7x worse than RTN on these models). Making
    the snapshot a copy, as it is on a GPU, restores AutoAWQ's intended arithmetic."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale

    def copying(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        live = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in live(*a, **k).items()}
        try:
            return search(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict

    AwqQuantizer._compute_best_scale = copying


def main() -> None:
    src, out, calib_path, group, *flags = sys.argv[1:]
    from awq import AutoAWQForCausalLM

    if "--as-is" not in flags:
        fix_cpu_alias()

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
