"""quantkit eval on inputs a new user gives it: weights holding NaN, a GGUF of another model, quantized HF folders,
an output folder that cannot take the report, and the bits per weight it reports for a converted file."""

import json
import re
import struct

import pytest
from click.testing import CliRunner

from quantkit import convert as api
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.evaluation import runner
from quantkit.evaluation.runner import evaluate
from quantkit.evaluation.variants import has_llama_cpp
from quantkit.source.gguf_file import GGUFFile
from quantkit.source.safetensors_file import SafetensorsFile

needs_llama_cpp = pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python is not installed")
FAST = {"ctx": 64, "max_windows": 2, "mc_items": 0}


def _plant_nan_hf(folder, name):
    """One NaN in tensor `name` (BF16) of an HF folder, written in place."""
    for shard in folder.glob("*.safetensors"):
        file = SafetensorsFile(shard)
        if name in file:
            begin = file.entries[name].begin
            file.close()
            with open(shard, "r+b") as f:
                f.seek(begin + 2 * 5)
                f.write(struct.pack("<H", 0x7FC0))  # BF16 quiet NaN
            return
    raise AssertionError(f"no tensor {name}")


def _plant_nan_gguf(path, name):
    """One NaN in F32 tensor `name` of a GGUF file, written in place."""
    tensor = GGUFFile(path).tensors[name]
    assert tensor.type.name == "F32"
    with open(path, "r+b") as f:
        f.seek(tensor.offset + 4 * 7)
        f.write(struct.pack("<f", float("nan")))


# ---- 2. NaN/Inf weights ------------------------------------------------------------------------------------------

def test_nan_weight_in_hf_target_is_refused_naming_the_tensor(model_cache, copy_model):
    bad = copy_model("qwen2")
    _plant_nan_hf(bad, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(QuantkitError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight has 1 NaN/Inf"):
        evaluate(model_cache("qwen2"), [bad], **FAST)


@pytest.fixture(scope="module")
def f32_with_nan(tmp_path_factory):
    from quantkit.testing.factory import make_tiny_model

    root = tmp_path_factory.mktemp("nan")
    model = make_tiny_model(root / "model", "qwen2")
    [(path, _)] = api.convert(model, ["gguf:F32"], root / "bad-F32.gguf")
    _plant_nan_gguf(path, "blk.0.ffn_down.weight")
    return model, path


def test_nan_weight_in_gguf_is_refused_on_torch(f32_with_nan):
    model, path = f32_with_nan
    with pytest.raises(QuantkitError, match=r"bad-F32\.gguf: tensor blk\.0\.ffn_down\.weight has 1 NaN/Inf"):
        evaluate(model, [path], backend="torch", **FAST)


@needs_llama_cpp
def test_nan_weight_in_gguf_is_refused_on_llama_cpp(f32_with_nan):
    model, path = f32_with_nan
    with pytest.raises(QuantkitError, match=r"bad-F32\.gguf: llama\.cpp computed NaN/Inf logits: the file's weights"):
        evaluate(model, [path], backend="llama.cpp", **FAST)


def test_cli_nan_weight_is_one_error_line_and_no_report(f32_with_nan, tmp_path):
    model, path = f32_with_nan
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", str(path), "--baseline", str(model), "--ctx", "64", "--windows", "2",
                                       "--mc-items", "0", "--backend", "torch", "-o", str(out)])
    problems = [line for line in result.output.splitlines() if " INFO quantkit." not in line]  # progress log lines
    assert result.exit_code == 2 and len(problems) == 1 and problems[0].startswith("error: "), result.output
    assert not (out / "report.json").exists()


# ---- 6. a GGUF of another model ------------------------------------------------------------------------------------

def test_gguf_of_another_model_is_refused_naming_both(model_cache, tmp_path):
    # Same vocabulary and tokenizer, another architecture: llama has no attn_q.bias, which qwen2's forward needs.
    [(other, _)] = api.convert(model_cache("llama"), ["gguf:Q8_0"], tmp_path / "llama-Q8_0.gguf")
    baseline = model_cache("qwen2")
    for backend in ["torch"] + (["llama.cpp"] if has_llama_cpp() else []):
        with pytest.raises(QuantkitError, match=rf"{other} is not a quantization of the baseline model "
                                                rf"{baseline}: its architecture is llama, the baseline's qwen2"):
            evaluate(baseline, [other], backend=backend, **FAST)


def test_gguf_with_other_shapes_is_refused(model_cache, tmp_path):
    wider = model_cache("qwen2", config_overrides=(("intermediate_size", 384),))
    [(other, _)] = api.convert(wider, ["gguf:Q8_0"], tmp_path / "wider.gguf")
    with pytest.raises(QuantkitError, match=r"is not a quantization of the baseline model .*: its tensor "
                                            r"blk\.0\.ffn_down\.weight is \[128, 384\], the baseline's \[128, 256\]"):
        evaluate(model_cache("qwen2"), [other], backend="torch", **FAST)


def test_hf_folder_of_another_model_is_refused(model_cache):
    with pytest.raises(QuantkitError, match="is not a quantization of the baseline model .*: its architecture is "
                                            "llama, the baseline's qwen2"):
        evaluate(model_cache("qwen2"), [model_cache("llama")], **FAST)


# ---- 7. quantized HF folders -----------------------------------------------------------------------------------------

def test_fp8_folder_is_labelled_from_its_quantization_config(model_cache):
    report = evaluate(model_cache("deepseek_v3", fp8=True), [], **FAST)
    assert report["baseline"]["type"] == "fp8 e4m3 block 128x128"


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq"])
def test_unreadable_quantization_method_is_refused(copy_model, method):
    folder = copy_model("qwen2")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match=rf"quant_method '{method}', which quantkit cannot read yet"):
        evaluate(folder, [], **FAST)


def test_compressed_tensors_schemes_other_than_pack_quantized_are_refused(copy_model):
    folder = copy_model("qwen2")
    config = json.loads((folder / "config.json").read_text())
    fp8 = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}, "format": "float-quantized"}
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "config_groups": {"group_0": fp8}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match="pack-quantized int4/int8 weight-only schemes; this one has format "
                                            "'float-quantized'"):
        evaluate(folder, [], **FAST)


# ---- 3. the output folder ------------------------------------------------------------------------------------------

def _no_run(*args, **kwargs):
    raise AssertionError("the evaluation ran before the output folder was checked")


def _eval_cli(out, *extra):
    return CliRunner().invoke(main, ["eval", "nothing.gguf", "--baseline", "tiny-qwen2", "-o", str(out), *extra])


def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "evaluate", _no_run)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _eval_cli(blocker / "report")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {blocker / 'report'}: cannot write the report there")


def test_existing_report_is_refused_without_force(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "evaluate", _no_run)
    (tmp_path / "report.md").write_text("an earlier run\n")
    result = _eval_cli(tmp_path)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {tmp_path} already holds a report (report.md); give another -o "
                                    "folder, or --force")
    assert (tmp_path / "report.md").read_text() == "an earlier run\n"


def test_force_replaces_an_existing_report(tmp_path, monkeypatch):
    (tmp_path / "report.md").write_text("an earlier run\n")
    report = {"settings": {"ctx": 64}, "baseline": {"name": "base"}, "variants": []}
    monkeypatch.setattr(runner, "evaluate", lambda *args, **kwargs: report)
    result = _eval_cli(tmp_path, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "an earlier run" not in (tmp_path / "report.md").read_text()


# ---- 4. one bits per weight ------------------------------------------------------------------------------------------

def test_convert_and_eval_print_the_same_bpw(tmp_path):
    converted = CliRunner().invoke(main, ["convert", "tiny-qwen2", "--to", "gguf:Q4_K_M", "-o", str(tmp_path)])
    assert converted.exit_code == 0, converted.output
    convert_bpw = re.search(r"([\d.]+) bpw\)", converted.output).group(1)
    [gguf] = tmp_path.glob("*.gguf")
    evaluated = CliRunner().invoke(main, ["eval", str(gguf), "--baseline", "tiny-qwen2", "--ctx", "64", "--windows",
                                          "1", "--mc-items", "0", "--backend", "torch", "-o", str(tmp_path / "r")])
    assert evaluated.exit_code == 0, evaluated.output
    table = [line for line in evaluated.output.splitlines() if line.startswith("| ")]
    bpw_column = [c.strip() for c in table[0].split("|")].index("bpw")
    assert [c.strip() for c in table[3].split("|")][bpw_column] == convert_bpw  # after the baseline's row
    report = json.loads((tmp_path / "r" / "report.json").read_text(), parse_constant=_no_constant)
    assert f"{report['variants'][0]['bpw']:.2f}" == convert_bpw
    # One window: the ±2σ is undefined, null rather than NaN (bare NaN is not JSON).
    assert report["variants"][0]["delta_ppl_pct_2sigma"] is None
    assert "nats" in report["fields"]["kld"] and "percentage points" in report["fields"]["delta_p_mean"]


def _no_constant(name):
    raise AssertionError(f"report.json holds {name}, which is not JSON")

