"""Runs inside the llm-compressor venv (tests/interop/envs/llmcompressor.txt), not with quantkit: AWQ W4A16_ASYM one
model with llm-compressor on given calibration token ids, save the compressed-tensors folder, then write the float32
weights its runtime computes (codes - zero point, x scale) as a plain HF folder quantkit can evaluate (the helpers
of llmcompressor_gptq.py).

    python llmcompressor_awq.py SRC OUT DENSE_OUT CALIB.json GROUP

Settings pinned to quantkit's `awq:w4g{GROUP}` (AutoAWQ's) where llm-compressor allows: AWQModifier with duo_scaling
True and n_grid 20 (its defaults, AutoAWQ's) and its built-in mappings for the model (q/k/v judged on the whole
self_attn, gate/up on the whole MLP or MoE with the router, v -> o, up -> down; DeepSeek's q_a/kv_a, q_b, kv_b,
its post-attention mapping split between dense and MoE layers: deepseek_mappings),
then QuantizationModifier with int4 asymmetric group-G weights (W4A16_ASYM with group G), min-max observer, lm_head
and the MoE router ignored, the sequential pipeline, MoE experts calibrated on the tokens routed to them. What
cannot be matched: llm-compressor has no AWQ clip search (AutoAWQ's apply_clip), so its groups keep min-max ranges.
CPU needs PEERS.md §6's workaround: IntermediatesCache.pin_memory is a no-op (it asks for an accelerator).
Prints one JSON line of timings (imports, load, oneshot, save).
"""

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402
from llmcompressor_gptq import dense_state, write_dense  # noqa: E402


def deepseek_mappings(config):
    """llm-compressor's DeepSeek mappings with the post-attention norm's split between the dense layers (gate/up)
    and the MoE layers (router, every expert's and the shared expert's gate/up): its own mapping lists the router
    for every layer and fails on models whose first_k_dense_replace layers have none ("AWQ needs to match a single
    smoothlayer for each mapping"), the case its GLM-4.7-Flash mapping works around by dropping the router."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, AWQMapping

    dense = "|".join(str(i) for i in range(config.first_k_dense_replace))
    moe = "|".join(str(i) for i in range(config.first_k_dense_replace, config.num_hidden_layers))
    out = [m for m in AWQ_MAPPING_REGISTRY["DeepseekV3ForCausalLM"] if "post_attention" not in m.smooth_layer]
    if dense:
        out.append(AWQMapping(rf"re:.*layers\.({dense})\.post_attention_layernorm$",
                              [rf"re:.*layers\.({dense})\.mlp\.gate_proj$", rf"re:.*layers\.({dense})\.mlp\.up_proj$"]))
    if moe:
        out.append(AWQMapping(rf"re:.*layers\.({moe})\.post_attention_layernorm$",
                              [rf"re:.*layers\.({moe})\.mlp\.gate$", rf"re:.*layers\.({moe})\.mlp\..*gate_proj$",
                               rf"re:.*layers\.({moe})\.mlp\..*up_proj$"]))
    return out


def main() -> None:
    src, out, dense_out, calib_path, group = sys.argv[1:]
    import datasets
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM

    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    torch.set_num_threads(2)
    t_import = time.perf_counter()
    ids = json.loads(open(calib_path).read())
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    t_load = time.perf_counter()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=int(group), observer="minmax"))
    mappings = deepseek_mappings(model.config) if model.config.model_type == "deepseek_v3" else None
    recipe = [AWQModifier(duo_scaling=True, n_grid=20, mappings=mappings),
              QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"])]
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=len(ids[0]), pipeline="sequential", shuffle_calibration_samples=False,
            moe_calibrate_all_experts=False)
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
