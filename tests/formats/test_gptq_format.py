"""The GPTQ output format without a consumer: spec grammar, packing, plan vs written bytes, the folder writer's
resume/refusal rules and its determinism, and quantkit's own GPTQ input decoder reading the output back."""

import json

import pytest
import torch

import quantkit.calib.gptq as gptq_calib
import quantkit.calib.layerwise as layerwise
from quantkit.errors import QuantkitError
from quantkit.formats import ConvertOptions, Job, get_format, parse_target
from quantkit.formats import gptq as fmt
from quantkit.formats.layerwise_folder import REPORT_NAME
from quantkit.model import Model
from quantkit.quant.gptq import GPTQConfig, dequantize, gptq_quantize, rtn_quantize
from quantkit.source.safetensors_file import SafetensorsFile

FORMAT = get_format("gptq")


@pytest.fixture
def calib():
    return layerwise


# ---- spec ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, canonical", [("w4g128", "w4g128"), ("W4G128-ACT", "w4g128-act"), ("w8", "w8"),
                                              ("w4g32-mse-asym", "w4g32-asym-mse"), ("w3g64-static-act",
                                                                                     "w3g64-act-static"),
                                              ("w4g128-rtn-asym", "w4g128-asym-rtn")])
def test_spec_canonical(spec, canonical):
    assert parse_target(f"gptq:{spec}").spec == canonical
    assert FORMAT.file_name("m", parse_target(f"gptq:{spec}")) == f"m-GPTQ-{canonical}"


@pytest.mark.parametrize("spec", ["w5g128", "w4g0", "w4g128-act-act", "w4-foo", "q4", "w4g", "w4g128-act-rtn"])
def test_spec_invalid_lists_grammar(spec):
    with pytest.raises(QuantkitError, match=r"w\{bits\}\[g\{group\}\].*w4g128-act"):
        parse_target(f"gptq:{spec}")


def test_spec_to_config():
    config = fmt.gptq_config(parse_target("gptq:w4g32-act-asym"), damp=0.05)
    assert (config.bits, config.group_size, config.desc_act, config.sym, config.damp_percent) == (4, 32, True,
                                                                                                  False, 0.05)
    assert fmt.gptq_config(parse_target("gptq:w8")).group_size == -1


# ---- packing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (64, 96), generator=g, dtype=torch.int32)
    words = fmt.pack(codes, bits, 0)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 96)
    assert torch.equal(fmt.unpack(words, bits, 0), codes)
    zeros = torch.randint(0, 2 ** bits, (96, 5), generator=g, dtype=torch.int32)  # [out, G], true zeros incl. 0
    qzeros = fmt.pack_zeros_v1(zeros, bits)
    assert qzeros.shape == (5, 96 * bits // 32)
    assert torch.equal(fmt.unpack_zeros_v1(qzeros, bits), zeros)


def test_three_bit_zeros_are_each_field_minus_one():
    """v1 qzeros hold zero - 1 in every field (mod 8), also in the fields that straddle two words (output channels
    10 and 21 of every 32), as AutoGPTQ packs them and GPTQModel reads them back field by field."""
    zeros = torch.full((64, 2), 4, dtype=torch.int32)  # the symmetric 3-bit zero point
    zeros[:, 1] = torch.arange(64) % 8
    stored = fmt.unpack(fmt.pack_zeros_v1(zeros, 3), 3, 1).T
    assert torch.equal(stored, (zeros - 1) % 8)


def test_pack_layout_matches_formats_md():
    # 4-bit: smallest input index in the least significant bits; symmetric v1 zeros are 0x77777777
    codes = torch.arange(8, dtype=torch.int32).reshape(8, 1)
    assert fmt.pack(codes, 4, 0).item() == 0x76543210
    assert torch.all(fmt.pack_zeros_v1(torch.full((8, 2), 8, dtype=torch.int32), 4) == 0x77777777)
    # 3-bit: row 10 straddles words 0 and 1, row 21 words 1 and 2 (FORMATS.md §5.2)
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10], codes[21] = 0b111, 0b101
    words = fmt.pack(codes, 3, 0)[:, 0].tolist()
    assert [w & 0xFFFFFFFF for w in words] == [0b11 << 30, (1 << 0) | (1 << 31), 0b10]
    # v1 zeros for 3-bit are the per-word constants GPTQModel subtracts
    ones = fmt.pack(torch.ones(32, 1, dtype=torch.int32), 3, 0)[:, 0].tolist()
    assert [w & 0xFFFFFFFF for w in ones] == [0x49249249, 0x92492492, 0x24924924]


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=32), GPTQConfig(bits=8, group_size=-1),
                                    GPTQConfig(bits=2, group_size=64, sym=False),
                                    GPTQConfig(bits=3, group_size=32, sym=False, desc_act=True)])
def test_stored_dequantizes_as_quant_gptq(config):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 4, 128)
    r = gptq_quantize(w, x.T @ x, config)  # columns of unequal importance: act-order permutes g_idx
    assert config.desc_act == bool((r.g_idx[1:] < r.g_idx[:-1]).any())
    stored = fmt.pack_result(r, config.bits)
    assert stored["qweight"].shape == (128 * config.bits // 32, 64) and stored["scales"].dtype == torch.float16
    expected = dequantize(r.q, r.scales.half().float(), r.zeros, r.g_idx)
    assert torch.equal(fmt.dequantize_stored(*(stored[s] for s in fmt.SUFFIXES), config.bits), expected)


# ---- writing ------------------------------------------------------------------------------------------------
def _convert(model_path, spec, out, **options):
    with Model(model_path) as model:
        target = parse_target(f"gptq:{spec}")
        options = ConvertOptions(calib_samples=4, calib_ctx=32, **options)
        plan = FORMAT.plan(model, target, options)
        path = out / FORMAT.file_name("m", target)
        return plan, FORMAT.write(model, [Job(target, plan, path)], options)[0]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def converted(model_cache, tmp_path_factory):
    """converted(preset, spec, **kwargs) -> (plan, files): `_convert` of a model_cache model, made once per module
    for the tests that only read the output (the same folder is a plan check, a shared-pass reference and a
    kill-and-resume reference)."""
    made = {}

    def get(preset, spec, **kwargs):
        key = (preset, spec, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = _convert(model_cache(preset, **kwargs), spec, tmp_path_factory.mktemp("gptq"))
        return made[key]

    return get


@pytest.mark.parametrize("preset, kwargs, spec", [("qwen2", {}, "w4g64-act"), ("deepseek_v3", {"fp8": True}, "w4g64"),
                                                  ("qwen2-tied", {}, "w4g64")])
def test_plan_bytes_equal_written_bytes(converted, calib, preset, kwargs, spec):
    plan, files = converted(preset, spec, **kwargs)
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
    assert not stored  # nothing written that the plan does not list (no MTP layer)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == plan.total_bytes
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq"
    assert config["quantization_config"]["desc_act"] is spec.endswith("-act")
    assert json.loads((folder / "quantize_config.json").read_text())["group_size"] == 64
    assert (folder / "tokenizer.json").is_file() and not list(folder.parent.glob("*.part"))
    with Model(folder) as out:  # a tied head is stored too (AutoGPTQ's loader needs it), as the embedding
        if out.arch.tie_word_embeddings:
            assert torch.equal(out.source.read("lm_head.weight"), out.source.read("model.embed_tokens.weight"))


def test_several_targets_share_one_pass_and_equal_separate_runs(model_cache, converted, tmp_path, calib, monkeypatch):
    src = model_cache("deepseek_v3", fp8=True)
    specs = ["w4g64", "w4g32-act", "w4g64-rtn"]
    alone = {spec: _files(converted("deepseek_v3", spec, fp8=True)[1][0].parent) for spec in specs}
    with Model(src) as model:
        reads, read = {}, model.source.read
        monkeypatch.setattr(model.source, "read", lambda n, *a, **k: (reads.__setitem__(n, reads.get(n, 0) + 1),
                                                                         read(n, *a, **k))[1])
        options = ConvertOptions(calib_samples=4, calib_ctx=32)
        jobs = [Job(t, FORMAT.plan(model, t, options), tmp_path / "all" / FORMAT.file_name("m", t))
                for t in (parse_target(f"gptq:{spec}") for spec in specs)]
        written = FORMAT.write(model, jobs, options)
    for spec, files in zip(specs, written, strict=True):
        assert _files(files[0].parent) == alone[spec], spec
    layer_linears = {lin.name for i in range(3) for lin in model.arch.layer_spec(i).linears}
    assert all(reads[n] == 1 for n in layer_linears if n in reads), {n: c for n, c in reads.items() if c > 1}


def test_round_to_nearest_needs_no_calibration(model_cache, tmp_path, calib, monkeypatch):
    import quantkit.calib.data as data

    monkeypatch.setattr(data, "calibration_samples", lambda *a, **k: pytest.fail("RTN calibrated"))
    src = model_cache("llama")
    _, files = _convert(src, "w4g32-rtn", tmp_path)
    folder = files[0].parent
    report = json.loads((folder / REPORT_NAME).read_text())
    assert report["method"] == "round-to-nearest" and report["calibration"] is None
    name = "model.layers.1.self_attn.o_proj.weight"
    with Model(folder) as out, Model(src) as ref:
        expected = gptq_calib.runtime_weight(rtn_quantize(ref.source.read(name), GPTQConfig(group_size=32)))
        assert torch.equal(out.source.read(name), expected)


def test_report_lists_expert_tokens_and_fallbacks(unrouted_expert_model, tmp_path, calib):
    src = unrouted_expert_model
    _, files = _convert(src, "w4g64", tmp_path)
    report = json.loads((files[0].parent / REPORT_NAME).read_text())
    assert report["method"] == "gptq" and report["calibration"]["samples"] == 4
    layer = report["layers"]["1"]
    assert layer["expert_tokens"][3] == 0 and "model.layers.1.mlp.experts.3" in layer["fallback_experts"]


def test_decoder_reads_output(model_cache, tmp_path, calib):
    src = model_cache("llama")
    _, files = _convert(src, "w4g32-asym", tmp_path)
    with Model(files[0].parent) as out, Model(src) as ref:
        assert out.source.label() == "GPTQ w4g32-asym"
        name = "model.layers.1.mlp.down_proj.weight"
        module = name.removesuffix(".weight")
        index = json.loads((files[0].parent / "model.safetensors.index.json").read_text())["weight_map"]
        shard = SafetensorsFile(files[0].parent / index[f"{module}.qweight"])
        stored = [shard.read(f"{module}.{s}") for s in fmt.SUFFIXES]
        shard.close()
        assert torch.equal(out.source.read(name), fmt.dequantize_stored(*stored, 4))
        assert "model.layers.1.mlp.down_proj.qweight" not in out.source
        ids = torch.arange(3, 40).unsqueeze(0)
        a, b = out.forward(ids), ref.forward(ids)
        assert (a - b).abs().max() < 0.5 * b.abs().max()


def test_fused_experts_refused(model_cache, calib):
    with Model(model_cache("deepseek_v3", fused_experts=True)) as model:
        with pytest.raises(QuantkitError, match="per-expert"):
            FORMAT.plan(model, parse_target("gptq:w4g128"), ConvertOptions())


def test_kill_and_resume_is_byte_identical(model_cache, converted, tmp_path, calib, monkeypatch, killed_at_layer):
    src = model_cache("deepseek_v3", fp8=True)
    whole = _files(converted("deepseek_v3", "w4g64", fp8=True)[1][0].parent)
    with killed_at_layer(2):
        _convert(src, "w4g64", tmp_path / "resumed")
    part = tmp_path / "resumed" / "m-GPTQ-w4g64.part"
    state = json.loads((part / "quantkit-state.json").read_text())
    assert sorted(state["shards"]) == ["0", "1", "other"]
    real, starts = calib.run_layers, []
    monkeypatch.setattr(calib, "run_layers", lambda *a, **k: (starts.append(a[1][0].start_layer), real(*a, **k))[1])
    _, files = _convert(src, "w4g64", tmp_path / "resumed")
    assert starts == [2]
    assert _files(files[0].parent) == whole


def test_corrupt_shard_is_redone(model_cache, tmp_path, killed_at_layer):
    src = model_cache("llama")  # act-order: resuming restores layers with a permuted g_idx
    _, files = _convert(src, "w4g32-act", tmp_path / "whole")
    whole = _files(files[0].parent)
    with killed_at_layer(None):  # every layer written, the folder not finished
        _convert(src, "w4g32-act", tmp_path / "resumed")
    shard = tmp_path / "resumed" / "m-GPTQ-w4g32-act.part" / "layer-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a kill during the write
    _, files = _convert(src, "w4g32-act", tmp_path / "resumed")
    assert _files(files[0].parent) == whole


def test_other_command_refused_and_existing_output(model_cache, tmp_path, killed_at_layer):
    src = model_cache("llama")
    with killed_at_layer(0):
        _convert(src, "w4g32", tmp_path)
    (tmp_path / "m-GPTQ-w4g32.part").rename(tmp_path / "m-GPTQ-w8.part")
    with pytest.raises(QuantkitError, match="OUT.part holds a run of a different command"):
        _convert(src, "w8", tmp_path)
    with pytest.raises(QuantkitError, match="OUT.part holds a run of a different command"):
        _convert(src, "w8", tmp_path, damp=0.1)
    _, files = _convert(src, "w4g32", tmp_path)
    with pytest.raises(QuantkitError, match="already exists.*--force"):
        _convert(src, "w4g32", tmp_path)
    _, again = _convert(src, "w4g32", tmp_path, force=True)
    assert again == files


def test_unwritable_location(model_cache, tmp_path, calib):
    blocker = tmp_path / "a-file"  # tests run as root here, so a read-only folder would not stop them
    blocker.write_text("")
    with pytest.raises(QuantkitError, match="a-file/m-GPTQ-w4g32.part: cannot create the output folder.*writable"):
        _convert(model_cache("llama"), "w4g32", blocker)


def test_rope_parameters_get_legacy_keys(copy_model, tmp_path, calib):
    src = copy_model("qwen2")
    config = json.loads((src / "config.json").read_text())
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (src / "config.json").write_text(json.dumps(config))
    _, files = _convert(src, "w8", tmp_path)
    written = json.loads((files[0].parent / "config.json").read_text())
    assert written["rope_theta"] == theta and "rope_scaling" not in written


# ---- mixes: GPTQModel's `dynamic` -----------------------------------------------------------------------------
def test_mix_names_each_odd_linear_in_dynamic_and_reads_back(model_cache, tmp_path, calib):
    """--tensor-type on a GPTQ target: every linear whose scheme is not the top level's gets a `dynamic` pattern
    (kept ones `-:` and stored BF16), which gives each module its plan scheme under GPTQModel's reading; quantkit's
    decoder reads every module at its own bits."""
    src = model_cache("llama")
    overrides = ["mlp.down_proj=w8", r"layers\.0\.self_attn=bf16", r"layers\.1\.mlp\.(gate|up)_proj=w3g32-asym"]
    plan, files = _convert(src, "w4g32-rtn", tmp_path, tensor_types=overrides)
    folder = files[0].parent
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert json.loads((folder / "quantize_config.json").read_text())["dynamic"] == config["dynamic"]
    assert (config["bits"], config["group_size"]) == (4, 32)
    linears = [e for e in plan.entries if e.name.startswith("model.layers.") and e.name.endswith("proj.weight")]
    for entry in linears:
        override = fmt.dynamic_override(config["dynamic"], entry.name.removesuffix(".weight"))
        if entry.scheme == "bf16":
            assert override is False
        elif entry.scheme == "w4g32-rtn":
            assert override is None
        else:
            own = fmt.GPTQConfig(override["bits"], override["group_size"], override["sym"], override["desc_act"])
            assert fmt.spec_of(own) + "-rtn" == entry.scheme
    assert {e.scheme for e in linears} == {"bf16", "w4g32-rtn", "w8-rtn", "w3g32-asym-rtn"}
    with Model(folder) as out, Model(src) as ref:
        assert out.source.label() == "GPTQ w4g32+bf16+w8+w3g32"
        kept = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(out.source.read(kept), ref.source.read(kept).float())
        for name, bound in (("model.layers.1.mlp.down_proj.weight", 0.01), ("model.layers.1.mlp.up_proj.weight", 0.3)):
            w, q = ref.source.read(name).float(), out.source.read(name)
            assert q.shape == w.shape and (q - w).norm() < bound * w.norm()


@pytest.mark.parametrize("modules, vllm, other", [
    (["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"],
     "model.layers.3.self_attn.qkv_proj", ["model.layers.3.self_attn.o_proj", "model.layers.13.self_attn.q_proj"]),
    (["model.layers.2.mlp.experts.0.gate_proj", "model.layers.2.mlp.experts.7.down_proj",
      "model.layers.2.mlp.experts.11.up_proj"], "model.layers.2.mlp.experts",
     ["model.layers.2.mlp.shared_experts.up_proj", "model.layers.21.mlp.experts.0.up_proj", "model.layers.2.mlp.gate"]),
    (["model.layers.0.mlp.down_proj"], "model.layers.0.mlp.down_proj", ["model.layers.10.mlp.down_proj"]),
])
def test_dynamic_patterns_match_a_unit_by_gptqmodel_s_and_vllm_s_names(modules, vllm, other):
    """GPTQModel searches each module's own name; vLLM matches (re.match) the fused module's prefix."""
    import re

    pattern = fmt.unit_pattern(modules)
    assert all(re.search(pattern, m) for m in modules) and re.match(pattern, vllm)
    assert not any(re.search(pattern, m) for m in other)


def test_mix_follows_vllm_s_sets(model_cache):
    with Model(model_cache("llama")) as model:
        with pytest.raises(QuantkitError, match=r"fused linears.*q_proj\.weight \(w8\)"):
            FORMAT.plan(model, parse_target("gptq:w4g128"), ConvertOptions(tensor_types=["q_proj=w8"]))
        plan = FORMAT.plan(model, parse_target("gptq:w4g128"),
                           ConvertOptions(tensor_types=["q_proj=w8"], fix_mix=True))
        assert plan.schemes["model.layers.0.self_attn.v_proj.weight"] == "w8"
        with pytest.raises(QuantkitError, match="GPTQ schemes are w2, w3, w4 or w8"):
            FORMAT.plan(model, parse_target("gptq:w4g128"), ConvertOptions(tensor_types=["mlp=w5"]))
