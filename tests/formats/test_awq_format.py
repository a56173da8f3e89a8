"""The AWQ output format without a consumer: spec grammar, AutoAWQ's GEMM packing, plan vs written bytes, quantkit's
AWQ input decoder reading the output back, the folded norms stored, and the layerwise folder's resume rules."""

import json

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats import ConvertOptions, Job, get_format, parse_target
from quantkit.formats import awq as fmt
from quantkit.formats.layerwise_folder import REPORT_NAME
from quantkit.model import Model
from quantkit.quant.awq import AWQConfig, dequantize, quantize
from quantkit.source.safetensors_file import SafetensorsFile

FORMAT = get_format("awq")


@pytest.mark.parametrize("spec, canonical", [("w4g128", "w4g128"), ("W4G32", "w4g32"), ("w4g64-rtn", "w4g64-rtn")])
def test_spec_canonical(spec, canonical):
    assert parse_target(f"awq:{spec}").spec == canonical
    assert FORMAT.file_name("m", parse_target(f"awq:{spec}")) == f"m-AWQ-{canonical}"


@pytest.mark.parametrize("spec", ["w8g128", "w4g100", "w4", "w4g128-act", "q4"])
def test_spec_invalid_lists_grammar(spec):
    with pytest.raises(QuantkitError, match=r"w4g\{group\}\[-rtn\].*32, 64 or 128"):
        parse_target(f"awq:{spec}")


def test_pack_layout_matches_formats_md():
    # nibble i of each word holds column ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7 of its eight
    codes = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    assert fmt.pack_awq(codes).item() == 0x75316420
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (24, 64), generator=g, dtype=torch.int32)
    assert torch.equal(fmt.unpack_awq(fmt.pack_awq(values)), values)


def test_stored_dequantizes_as_quant_awq():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    config = AWQConfig(group_size=32)
    r = quantize(w, config)
    stored = fmt.pack_result(r)
    assert stored["qweight"].shape == (128, 8) and stored["qzeros"].shape == (4, 8)
    assert stored["scales"].shape == (4, 64) and stored["scales"].dtype == torch.float16
    expected = dequantize(r.q, r.scales.half().float(), r.zeros, 32)
    assert torch.equal(fmt.dequantize_stored(*(stored[s] for s in fmt.SUFFIXES)), expected)


def _convert(model_path, spec, out, **options):
    with Model(model_path) as model:
        target = parse_target(f"awq:{spec}")
        options = ConvertOptions(calib_samples=4, calib_ctx=32, **options)
        plan = FORMAT.plan(model, target, options)
        return plan, FORMAT.write(model, [Job(target, plan, out / FORMAT.file_name("m", target))], options)[0]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def converted(model_cache, tmp_path_factory):
    """converted(preset, spec, **kwargs) -> (plan, files): `_convert` of a model_cache model, made once per module
    for the tests that only read the output (a plan check and a kill-and-resume reference share one)."""
    made = {}

    def get(preset, spec, **kwargs):
        key = (preset, spec, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = _convert(model_cache(preset, **kwargs), spec, tmp_path_factory.mktemp("awq"))
        return made[key]

    return get


@pytest.mark.parametrize("preset, kwargs", [("qwen2", {}), ("deepseek_v3", {"fp8": True})])
def test_plan_bytes_equal_written_bytes_and_output_reads_back(model_cache, converted, preset, kwargs):
    src = model_cache(preset, **kwargs)
    plan, files = converted(preset, "w4g32", **kwargs)
    folder = files[0].parent
    stored = {}
    for f in files:
        sf = SafetensorsFile(f)
        stored.update({n: e.nbytes for n, e in sf.entries.items()})
        sf.close()
    for entry in plan.entries:
        module = entry.name.removesuffix(".weight")
        parts = [f"{module}.{s}" for s in fmt.SUFFIXES] if entry.quantized else [entry.name]
        assert sum(stored.pop(p) for p in parts) == entry.nbytes, entry.name
    assert not stored
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": 4, "group_size": 32,
                  "modules_to_not_convert": None}
    report = json.loads((folder / REPORT_NAME).read_text())
    layer0 = report["layers"]["0"]
    assert "model.layers.0.input_layernorm.weight" in layer0["replaced_tensors"]
    with Model(folder) as out, Model(src) as ref:
        assert out.source.label() == "AWQ w4g32"
        ids = torch.arange(3, 40).unsqueeze(0)
        a, b = out.forward(ids), ref.forward(ids)
        assert (a - b).pow(2).mean() < 0.3 * b.pow(2).mean()  # random tiny weights: 4-bit error, not garbage
        norm = "model.layers.0.input_layernorm.weight"
        assert not torch.equal(out.source.read(norm), ref.source.read(norm))  # carries the folded scales


def test_kill_and_resume_is_byte_identical(model_cache, converted, tmp_path, killed_at_layer):
    src = model_cache("deepseek_v3", fp8=True)
    whole = _files(converted("deepseek_v3", "w4g32", fp8=True)[1][0].parent)
    with killed_at_layer(2):
        _convert(src, "w4g32", tmp_path / "resumed")
    _, files = _convert(src, "w4g32", tmp_path / "resumed")
    assert _files(files[0].parent) == whole


def test_shapes_the_layout_cannot_hold_are_refused_before_work(model_cache):
    with Model(model_cache("deepseek_v3-ragged")) as model:  # hidden size 200
        with pytest.raises(QuantkitError, match="divisible by 8 and input columns by the group size 32"):
            FORMAT.plan(model, parse_target("awq:w4g32"), ConvertOptions())


def test_an_architecture_without_a_folding_rule_is_refused_before_work(model_cache, monkeypatch):
    from quantkit.arch.base import Architecture

    with Model(model_cache("llama")) as model:
        monkeypatch.setattr(type(model.arch), "norm_block", Architecture.norm_block)
        with pytest.raises(QuantkitError, match="does not know how AWQ's scales fold into llama"):
            FORMAT.plan(model, parse_target("awq:w4g32"), ConvertOptions())


def test_gptq_and_awq_targets_share_one_pass_and_equal_separate_runs(model_cache, tmp_path, monkeypatch):
    from quantkit.convert import convert
    from quantkit.source.hf import HFCheckpoint

    src = model_cache("deepseek_v3", fp8=True)
    specs = ["awq:w4g64", "gptq:w4g64", "awq:w4g32-rtn"]
    options = {"calib_samples": 4, "calib_ctx": 32}
    alone = {s: _files(convert(src, [s], tmp_path / s.replace(":", "-"), **options)[0][0]) for s in specs}
    reads, read = {}, HFCheckpoint.read
    monkeypatch.setattr(HFCheckpoint, "read", lambda self, n, *a, **k: (
        reads.__setitem__(n, reads.get(n, 0) + 1), read(self, n, *a, **k))[1])
    written = convert(src, specs, tmp_path / "all", **options)
    for spec, (folder, _) in zip(specs, written, strict=True):
        assert _files(folder) == alone[spec], spec
    with Model(src) as model:
        layer_linears = {lin.name for i in range(3) for lin in model.arch.layer_spec(i).linears}
    assert layer_linears & set(reads) and all(reads[n] == 1 for n in layer_linears if n in reads), reads
