"""The compressed-tensors output without a consumer: spec grammar, pack-quantized layout (FORMATS.md §7.3) written
from the text here, the GPTQ/AWQ grids on compressed-tensors' signed grid, plan vs written bytes, the config,
quantkit's decoder reading the output back, kill + resume, and the shared pass with GPTQ/AWQ targets."""

import json

import pytest
import torch

import quantkit.calib.layerwise as layerwise
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
                                              ("w8g32-mse-act-gptq", "w8g32-gptq-act-mse")])
def test_spec_canonical(spec, canonical):
    target = parse_target(f"ct:{spec}")
    assert target.spec == canonical and fmt.FORMAT.file_name("m", target) == f"m-CT-{canonical}"


@pytest.mark.parametrize("spec", ["w3g128", "w4g100", "w4-awq", "w8g128-awq", "w4g128-act", "w4g128-gptq-awq",
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


class Killed(Exception):
    pass


@pytest.mark.parametrize("spec", ["w4g32-asym-gptq", "w4g32-awq"])
def test_kill_and_resume_is_byte_identical(model_cache, tmp_path, monkeypatch, spec):
    """The quantized forward uses BF16-rounded scales, as the resumed run reads them back."""
    src = model_cache("deepseek_v3", fp8=True)
    ((whole, _),) = convert(src, [f"ct:{spec}"], tmp_path / "whole", **OPTIONS)
    real = layerwise.run_layers

    def dying(*args, **kwargs):
        for index in real(*args, **kwargs):
            if index == 2:
                raise Killed
            yield index

    monkeypatch.setattr(layerwise, "run_layers", dying)
    with pytest.raises(Killed):
        convert(src, [f"ct:{spec}"], tmp_path / "resumed", **OPTIONS)
    monkeypatch.setattr(layerwise, "run_layers", real)
    ((resumed, _),) = convert(src, [f"ct:{spec}"], tmp_path / "resumed", **OPTIONS)
    assert {p.name: p.read_bytes() for p in resumed.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}


def test_group_sizes_the_model_cannot_hold_are_refused_before_work(model_cache):
    with Model(model_cache("deepseek_v3-ragged")) as model:  # hidden size 200
        with pytest.raises(QuantkitError, match="group 32 needs input columns divisible by it"):
            fmt.FORMAT.plan(model, parse_target("ct:w4g32"), fmt.ConvertOptions())
