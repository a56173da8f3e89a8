"""The compressed-tensors output without a consumer: spec grammar, pack-quantized layout (FORMATS.md §7.3) written
from the text here, the GPTQ/AWQ grids on compressed-tensors' signed grid, plan vs written bytes, the config,
quantkit's decoder reading the output back, kill + resume, and the shared pass with GPTQ/AWQ targets."""

import json
import re

import pytest
import torch

from quantkit.convert import convert
from quantkit.errors import QuantkitError
from quantkit.formats import compressed_tensors as fmt
from quantkit.formats import parse_target
from quantkit.model import Model
from quantkit.quant.gptq import GPTQConfig, rtn_quantize
from quantkit.source.safetensors_file import SafetensorsFile

OPTIONS = {"calib_samples": 4, "calib_ctx": 32}


@pytest.mark.parametrize("spec, canonical", [("w4g128", "w4g128"), ("W8", "w8"), ("w4g64-gptq-asym", "w4g64-asym-gptq"),
                                              ("w4g128-awq", "w4g128-awq"), ("w4g128-asym-awq", "w4g128-awq"),
                                              ("w8g64-awq", "w8g64-awq"),
                                              ("w8g32-mse-act-gptq", "w8g32-gptq-act-mse")])
def test_spec_canonical(spec, canonical):
    target = parse_target(f"ct:{spec}")
    assert target.spec == canonical and fmt.FORMAT.file_name("m", target) == f"m-CT-{canonical}"


@pytest.mark.parametrize("spec", ["w3g128", "w4g100", "w4-awq", "w8-awq", "w4g128-act", "w4g128-gptq-awq",
                                  "w4g128-static-gptq", "q4"])
def test_spec_invalid_lists_grammar(spec):
    with pytest.raises(QuantkitError, match=r"w\{bits\}\[g\{group\}\]\[-asym\]\[-gptq\|-awq\]"):
        parse_target(f"ct:{spec}")


def test_packing_follows_formats_md():
    # element t of each run of 32/bits goes to bits [bits*t, bits*(t+1)), LSB first; codes are stored with the
    # 2^(bits-1) offset, i.e. as the unsigned 0..2^bits-1 the GPTQ/AWQ grids use
    q4 = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    zeros = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8], [9]], dtype=torch.int32)  # 9 rows: padded to 16
    result = rtn_quantize(torch.zeros(9, 8), GPTQConfig(bits=4, group_size=8, sym=False))
    result.q[:], result.zeros[:] = q4, zeros
    stored = fmt.pack_result(result, fmt.parse_scheme("w4g32-asym"))
    assert stored["weight_packed"].shape == (9, 1) and stored["weight_packed"][0, 0].item() == 0x76543210
    assert stored["weight_zero_point"].shape == (2, 1)
    assert stored["weight_zero_point"][0, 0].item() == 0x87654321 - (1 << 32)
    assert stored["weight_zero_point"][1, 0].item() == 9
    assert stored["weight_shape"].dtype == torch.int64 and stored["weight_shape"].tolist() == [9, 8]
    assert stored["weight_scale"].dtype == torch.bfloat16
    q8 = rtn_quantize(torch.zeros(1, 4), GPTQConfig(bits=8, group_size=-1))
    q8.q[:] = torch.tensor([[1, 2, 3, 4]])
    assert fmt.pack_result(q8, fmt.parse_scheme("w8"))["weight_packed"].item() == 0x04030201


@pytest.mark.parametrize("spec", ["w4g32", "w8", "w4g32-asym", "w8g32-asym"])
def test_round_to_nearest_is_compressed_tensors_min_max_grid(spec):
    """compressed-tensors' calculate_qparams (FORMATS.md §7.3), written here: min/max widened to include 0;
    symmetric scale = max |.| / ((q_max - q_min) / 2), zero 0; asymmetric scale = (max - min) / (q_max - q_min),
    zero = round(clamp(q_min - min / scale)); q = clamp(round(w / scale) + zero, q_min, q_max)."""
    scheme = fmt.parse_scheme(spec)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    w[0, :32] = torch.rand(32) + 0.1  # a group with no negative value
    result = rtn_quantize(w, scheme.gptq())
    q_min, q_max = -2 ** (scheme.bits - 1), 2 ** (scheme.bits - 1) - 1
    groups = w.reshape(16, -1, 64 if scheme.group_size == -1 else scheme.group_size)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    if scheme.sym:
        scale, zero = torch.maximum(lo.abs(), hi) / ((q_max - q_min) / 2), torch.zeros_like(lo)
    else:
        scale = (hi - lo) / (q_max - q_min)
        zero = torch.round((q_min - lo / scale).clamp(q_min, q_max))
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], q_min, q_max).reshape(w.shape)
    assert torch.equal(result.scales, scale)
    assert torch.equal(result.zeros - 2 ** (scheme.bits - 1), zero.to(torch.int32))
    assert torch.equal(result.q - 2 ** (scheme.bits - 1), q.to(torch.int32))


@pytest.mark.parametrize("preset, kwargs, spec", [("qwen2", {}, "w4g32"), ("deepseek_v3", {"fp8": True}, "w8"),
                                                  ("deepseek_v3", {"fp8": True}, "w4g32-asym-gptq"),
                                                  ("llama", {}, "w4g32-awq")])
def test_plan_bytes_config_and_read_back(model_cache, tmp_path, preset, kwargs, spec):
    src = model_cache(preset, **kwargs)
    ((folder, plan),) = convert(src, [f"ct:{spec}"], tmp_path, **OPTIONS)
    stored = {}
    for f in folder.glob("*.safetensors"):
        sf = SafetensorsFile(f)
        stored.update({n: e.nbytes for n, e in sf.entries.items()})
        sf.close()
    for entry in plan.entries:
        module = entry.name.removesuffix(".weight")
        parts = [n for n in list(stored) if n.startswith(module + ".weight_")] if entry.quantized else [entry.name]
        assert sum(stored.pop(p) for p in parts) == entry.nbytes, entry.name
    assert not stored
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = fmt.parse_scheme(spec)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["config_groups"] == {"group_0": {"targets": ["Linear"], "weights": scheme.weights_args(),
                                               "input_activations": None, "output_activations": None,
                                               "format": "pack-quantized"}}
    routers = [f"model.layers.{i}.mlp.gate" for i in range(3) if preset == "deepseek_v3" and i >= 1]
    assert qc["ignore"][-1] == "lm_head" and [n for n in qc["ignore"] if n.endswith("mlp.gate")] == routers
    with Model(folder) as out, Model(src) as ref:
        assert out.source.label().startswith("compressed-tensors w")
        ids = torch.arange(3, 40).unsqueeze(0)
        a, b = out.forward(ids), ref.forward(ids)
        assert (a - b).pow(2).mean() < 0.3 * b.pow(2).mean()  # random tiny weights: quantization error, not garbage


@pytest.mark.parametrize("spec, overrides", [("w4g32-awq", [r"layers\.0\.mlp=bf16", "self_attn=w8g32"]),
                                             ("w4g32-asym-gptq", ["self_attn=w8", r"layers\.0\.mlp=bf16"])])
def test_kill_and_resume_is_byte_identical(model_cache, tmp_path, killed_at_layer, spec, overrides):
    """The quantized forward uses BF16-rounded scales and kept linears, as the resumed run reads them back."""
    src = model_cache("deepseek_v3", fp8=True)
    options = {**OPTIONS, "tensor_types": overrides}
    ((whole, _),) = convert(src, [f"ct:{spec}"], tmp_path / "whole", **options)
    with killed_at_layer(2):
        convert(src, [f"ct:{spec}"], tmp_path / "resumed", **options)
    ((resumed, _),) = convert(src, [f"ct:{spec}"], tmp_path / "resumed", **options)
    assert {p.name: p.read_bytes() for p in resumed.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}


def test_group_sizes_the_model_cannot_hold_are_refused_before_work(model_cache):
    with Model(model_cache("deepseek_v3-ragged")) as model:  # hidden size 200
        with pytest.raises(QuantkitError, match="group 32 needs input columns divisible by it"):
            fmt.FORMAT.plan(model, parse_target("ct:w4g32"), fmt.ConvertOptions())


# ---- mixes: --tensor-type REGEX=SCHEME, runtime rules ---------------------------------------------------------------
def _plan(src, spec, *overrides, fix_mix=False):
    ((_, plan),) = convert(src, [f"ct:{spec}"], None, dry_run=True, tensor_types=list(overrides), fix_mix=fix_mix)
    return {e.name: e for e in plan.entries}


def test_first_matching_override_wins_and_is_noted(model_cache):
    plan = _plan(model_cache("llama"), "w4g32-gptq", r"layers\.0\.self_attn=bf16", "self_attn=w8")
    q0, q1 = plan["model.layers.0.self_attn.q_proj.weight"], plan["model.layers.1.self_attn.q_proj.weight"]
    assert (q0.scheme, q0.quantized, q0.note) == ("bf16", False, r"--tensor-type layers\.0\.self_attn=bf16")
    assert (q1.scheme, q1.note) == ("w8-gptq", "--tensor-type self_attn=w8")
    assert plan["model.layers.1.mlp.down_proj.weight"].scheme == "w4g32-gptq"
    with pytest.raises(QuantkitError, match=r"--tensor-type q_proj=w4g32: 'q_proj' matches no tensor"):
        _plan(model_cache("llama"), "w4g32", "self_attn=w8", "q_proj=w4g32")  # all taken by the first


@pytest.mark.parametrize("override, message", [
    ("nothing_here=w8", "'nothing_here' matches no tensor"),
    ("self_attn=q8_0", "'q8_0' is not a scheme of any target"),
    ("self_attn=w3", "compressed-tensors schemes are w4 or w8"),
    ("self_attn=w4g100", "compressed-tensors schemes are w4 or w8"),
    ("self_attn=", "malformed --tensor-type"),
    ("(=w8", "not a valid regular expression"),
])
def test_bad_overrides_are_refused_with_their_text(model_cache, override, message):
    with pytest.raises(QuantkitError, match=re.escape(message)):
        _plan(model_cache("llama"), "w4g32", override)


def test_awq_folders_refuse_mixes_and_point_to_ct(model_cache):
    with pytest.raises(QuantkitError, match=r"one scheme for every linear.*--to ct:"):
        convert(model_cache("llama"), ["awq:w4g32"], None, dry_run=True, tensor_types=["mlp=w8"])


def test_awq_targets_take_grouped_overrides_with_zero_points(model_cache):
    plan = _plan(model_cache("llama"), "w4g32-awq", r"down_proj=bf16", r"self_attn=w8g64")
    assert plan["model.layers.0.mlp.down_proj.weight"].scheme == "bf16"
    assert plan["model.layers.0.self_attn.o_proj.weight"].scheme == "w8g64-awq"
    with pytest.raises(QuantkitError, match="AWQ quantizes in groups"):
        _plan(model_cache("llama"), "w4g32-awq", r"down_proj=w8")


@pytest.mark.parametrize("preset, kwargs, override, rule, odd", [
    ("llama", {}, "q_proj=w8", "fused linears", "model.layers.0.self_attn.q_proj.weight (w8)"),
    ("llama", {}, "up_proj=bf16", "fused linears", "model.layers.0.mlp.up_proj.weight (bf16)"),
    ("deepseek_v3", {"fp8": True}, "kv_a_proj_with_mqa=w8", "fused linears",
     "model.layers.0.self_attn.kv_a_proj_with_mqa.weight (w8)"),
    ("deepseek_v3", {"fp8": True}, r"experts\.1\.down_proj=w8", "MoE experts",
     "model.layers.1.mlp.experts.1.down_proj.weight (w8)"),
])
def test_runtime_rules_refuse_a_mix_naming_rule_and_tensors(model_cache, preset, kwargs, override, rule, odd):
    with pytest.raises(QuantkitError, match=rf"breaks a runtime rule: {rule}.*{re.escape(odd)}.*--fix-mix"):
        _plan(model_cache(preset, **kwargs), "w4g32", override)


def test_fix_mix_promotes_each_set_to_its_most_precise_scheme(model_cache):
    plan = _plan(model_cache("deepseek_v3", fp8=True), "w4g64", r"layers\.1\.mlp\.experts\.1\.down_proj=w8",
                 "shared_experts.up_proj=bf16", fix_mix=True)
    experts = [e for n, e in plan.items() if ".mlp.experts." in n and ".layers.1." in n]
    assert experts and all(e.scheme == "w8" for e in experts)
    assert plan["model.layers.1.mlp.experts.0.gate_proj.weight"].note == "promoted from w4g64: MoE experts"
    assert plan["model.layers.1.mlp.shared_experts.gate_proj.weight"].scheme == "bf16"
    assert plan["model.layers.1.mlp.shared_experts.down_proj.weight"].scheme == "w4g64"  # not fused with gate/up
    # one scheme for the routed experts of every layer (transformers fuses them across the model)
    assert all(e.scheme == "w8" for n, e in plan.items() if ".mlp.experts." in n and ".layers.2." in n)


def test_mixed_config_groups_target_every_module_exactly_once(model_cache, tmp_path):
    src = model_cache("deepseek_v3", fp8=True)
    overrides = ["self_attn=w8", r"layers\.0\.mlp=bf16", r"mlp\.experts=w4g32-asym"]
    ((folder, plan),) = convert(src, ["ct:w4g64-gptq"], tmp_path, tensor_types=overrides, **OPTIONS)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    schemes = {e.name.removesuffix(".weight"): e.scheme for e in plan.entries if e.name.startswith("model.layers.")
               and e.name.endswith(".weight") and len(e.shape) == 2 and not e.name.endswith("mlp.gate.weight")}
    assert len(qc["config_groups"]) == 3
    for module, scheme in schemes.items():
        groups = [g for g in qc["config_groups"].values()
                  if any(re.match(t.removeprefix("re:"), module) for t in g["targets"])]
        if scheme == "bf16":
            assert not groups and module in qc["ignore"], module
        else:
            assert len(groups) == 1, (module, groups)
            bits = groups[0]["weights"]["num_bits"]
            assert scheme.startswith(f"w{bits}"), (module, scheme, groups[0]["weights"])
    with Model(folder) as out:
        assert out.source.label() == "compressed-tensors w4g32-asym+w8+w4g64"  # routed experts group first
        kept = "model.layers.0.mlp.down_proj.weight"
        assert out.source.info(kept).dtype == "BF16" and out.source.read(kept).dtype == torch.float32


def test_keep_first_dense_keeps_deepseeks_dense_layers_in_every_format(model_cache):
    src = model_cache("deepseek_v3", fp8=True)  # layer 0 dense, 1-2 MoE
    (_, ct), (_, gguf) = convert(src, ["ct:w4g64", "gguf:Q4_K_M"], None, dry_run=True, keep_first_dense=True)
    ct_schemes = {e.name: e.scheme for e in ct.entries}
    assert ct_schemes["model.layers.0.mlp.down_proj.weight"] == "bf16"
    assert ct_schemes["model.layers.0.self_attn.o_proj.weight"] == "bf16"
    assert ct_schemes["model.layers.1.mlp.shared_experts.down_proj.weight"] == "w4g64"
    gguf_schemes = {e.name: e.scheme for e in gguf.entries}
    assert gguf_schemes["blk.0.ffn_down.weight"] == "BF16" and gguf_schemes["blk.1.ffn_down_shexp.weight"] != "BF16"
    with pytest.raises(QuantkitError, match="--keep-first-dense needs .* MoE model"):
        convert(model_cache("llama"), ["ct:w4g64"], None, dry_run=True, keep_first_dense=True)
