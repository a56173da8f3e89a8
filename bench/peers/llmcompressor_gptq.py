"""Runs inside the llm-compressor venv (tests/interop/envs/llmcompressor.txt), not with quantkit: GPTQ W4A16 one
model with llm-compressor on given calibration token ids, save the compressed-tensors folder, then write the
float32 weights its runtime computes (codes x scale, dequantized) as a plain HF folder quantkit can evaluate.

    python llmcompressor_gptq.py SRC OUT DENSE_OUT CALIB.json GROUP [--all-experts]

Settings pinned to quantkit's `gptq:w4g{GROUP}` where llm-compressor allows: int4 symmetric group strategy,
min-max observer, actorder None (its default is "static"), dampening_frac 0.01, block_size 128, lm_head ignored,
the sequential pipeline (layer by layer, quantized outputs propagated), MoE experts calibrated on the tokens
routed to them (moe_calibrate_all_experts False; its default True sends every token to every expert) unless
--all-experts. What cannot be matched: llm-compressor computes each group's scale from the weight before GPTQ's
updates (AutoGPTQ's static_groups), quantkit and GPTQModel from the updated weight when GPTQ reaches the group.
Prints one JSON line of timings (imports, load, oneshot, save).
"""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402


def dense_state(model, tied: bool) -> dict:
    """Every float tensor the model holds, quantized Linears replaced by fake_quantize(weight) (scale x codes)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out, worst = {}, 0.0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
            w = module.weight.detach().float()
            zp = getattr(module, "weight_zero_point", None)
            q = fake_quantize(w, module.weight_scale.float(), zp, scheme.weights)
            worst = max(worst, (q - w).abs().max().item())
            out[f"{name}.weight"] = q.contiguous()
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the embedding's alias: the source folder has no such tensor
        if name not in out and tensor.is_floating_point() and not name.rsplit(".", 1)[-1].startswith(
                ("weight_scale", "weight_zero_point", "weight_g_idx", "input_", "output_")):
            out[name] = tensor.detach().float().contiguous()
    return out, worst


def write_dense(src: str, dense_out: str, dense: dict) -> None:
    """The dense copy: the source folder's tokenizer and config without quantization, float32 safetensors."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    dst = Path(dense_out)
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, dst / f.name)
    config = json.loads((Path(src) / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(dense, str(dst / "model.safetensors"))


def main() -> None:
    src, out, dense_out, calib_path, group, *flags = sys.argv[1:]
    import datasets
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    t_import = time.perf_counter()
    ids = json.loads(open(calib_path).read())
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    t_load = time.perf_counter()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=int(group), observer="minmax"))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"], actorder=None,
                          dampening_frac=0.01, block_size=128)
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=len(ids[0]), pipeline="sequential", shuffle_calibration_samples=False,
            moe_calibrate_all_experts="--all-experts" in flags)
    t_quant = time.perf_counter()
    dense, worst = dense_state(model, bool(getattr(model.config, "tie_word_embeddings", False)))
    model.save_pretrained(out, save_compressed=True)
    t_save = time.perf_counter()

    write_dense(src, dense_out, dense)  # not timed
    print(json.dumps({"import_s": t_import - T0, "load_s": t_load - t_import, "quantize_s": t_quant - t_load,
                      "save_s": t_save - t_quant, "fake_quant_vs_weight_max": worst,
                      "quantized_linears": sum(1 for m in model.modules() if hasattr(m, "weight_scale"))}))


if __name__ == "__main__":
    main()
