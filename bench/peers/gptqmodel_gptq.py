"""Runs inside the GPTQModel venv (tests/interop/envs/gptqmodel.txt), not with quantkit: GPTQ one model with
GPTQModel on given calibration token ids and save a GPTQ (v1) folder.

    python gptqmodel_gptq.py SRC OUT CALIB.json GROUP [--true-sequential] [--act-group-aware] [--damp D]

CALIB.json: a list of token-id lists (every tool gets the same ones). Settings are pinned to quantkit's
`gptq:w4g{GROUP}` rather than GPTQModel's defaults (damp 0.05, act_group_aware True, true_sequential True,
offload_to_disk True): 4-bit, symmetric, no act-order / group-aware reordering, static_groups off, no MSE
clipping, damp 0.01, layer-level sequential, no disk offload, float32. Prints one JSON line of timings (seconds
since the interpreter started for the imports, then load / quantize / save).
"""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    src, out, calib_path, group = args[:4]
    flags = args[4:]
    damp = float(flags[flags.index("--damp") + 1]) if "--damp" in flags else 0.01
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(2)
    t_import = time.perf_counter()
    ids = json.loads(open(calib_path).read())
    calib = [{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids]
    config = QuantizeConfig(bits=4, group_size=int(group), sym=True, desc_act=False,
                            act_group_aware="--act-group-aware" in flags, static_groups=False, mse=0.0,
                            damp_percent=damp, true_sequential="--true-sequential" in flags,
                            offload_to_disk=False, format="gptq")
    model = GPTQModel.load(src, config, device="cpu", dtype=torch.float32)
    t_load = time.perf_counter()
    # batch 1 and no length sort: every sample is the same length, order kept as given
    model.quantize(calib, batch_size=1, calibration_sort=None)
    t_quant = time.perf_counter()
    model.save(out)
    t_save = time.perf_counter()
    print(json.dumps({"import_s": t_import - T0, "load_s": t_load - t_import, "quantize_s": t_quant - t_load,
                      "save_s": t_save - t_quant, "config": {k: str(v) for k, v in {
                          "damp_percent": config.damp_percent, "desc_act": config.desc_act,
                          "act_group_aware": config.act_group_aware, "true_sequential": config.true_sequential,
                          "static_groups": config.static_groups, "mse": config.mse, "sym": config.sym,
                          "fallback": config.fallback}.items()}}))


if __name__ == "__main__":
    main()
