import json
import math

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from quantkit import __version__
from quantkit.cli import main
from quantkit.inspection import inspect_checkpoint, inspect_gguf

CASES = [("llama", {}), ("llama-rope3", {}), ("qwen2", {}), ("qwen2-tied", {}), ("deepseek_v3", {}),
         ("deepseek_v3", {"fp8": True}), ("deepseek_v3", {"fused_experts": True}),
         ("deepseek_v3-ragged", {"fp8": True})]


@pytest.mark.parametrize("preset,kwargs", CASES, ids=[p + "".join(f"-{k}" for k in kw) for p, kw in CASES])
def test_parameter_count_equals_transformers(model_cache, preset, kwargs):
    transformers = pytest.importorskip("transformers")
    folder = model_cache(preset, **kwargs)
    report = inspect_checkpoint(folder)
    # transformers counts what its model holds; FP8 folders are counted on the same shapes (bf16 config)
    config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert report["parameters"]["total"] == model.num_parameters()


def test_active_parameters_of_moe(model_cache):
    report = inspect_checkpoint(model_cache("deepseek_v3"))
    cfg = json.loads((model_cache("deepseek_v3") / "config.json").read_text())
    routed_per_expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    moe_layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    unused = moe_layers * routed_per_expert * (cfg["n_routed_experts"] - cfg["num_experts_per_tok"])
    assert report["parameters"]["active"] == report["parameters"]["total"] - unused
    assert report["skipped_tensors"]["count"] > 0  # the MTP layer


def test_fp8_report(model_cache):
    report = inspect_checkpoint(model_cache("deepseek_v3", fp8=True))
    assert report["fp8"] == {"detected": True, "block_size": [128, 128]}
    assert set(report["dtypes"]) == {"BF16", "F8_E4M3", "F32"}
    shards = model_cache("deepseek_v3", fp8=True).glob("*.safetensors")
    assert report["size_on_disk"] == sum(p.stat().st_size for p in shards)
    fp8_linears = [t for t in report["quantizable"]["tensors"] if t["dtype"] == "F8_E4M3"]
    assert len(fp8_linears) == report["quantizable"]["linear_weights"]


def test_cli_inspect_text_and_json(model_cache):
    folder = model_cache("qwen2")
    runner = CliRunner()
    text = runner.invoke(main, ["inspect", str(folder)])
    assert text.exit_code == 0, text.output
    assert "qwen2" in text.output and "quantizable" in text.output
    as_json = runner.invoke(main, ["inspect", str(folder), "--json"])
    report = json.loads(as_json.output)
    assert report["quantizable"]["by_role"]["self_attn.q_proj"] == 2
    assert report["architecture"] == "qwen2"


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_inspect_single_safetensors_file(model_cache):
    shard = sorted(model_cache("llama").glob("*.safetensors"))[0]
    report = inspect_checkpoint(shard)
    assert report["architecture"] is None and report["tensors"] > 0


def _bits(path, keep) -> float:
    """bpw of the tensors `keep` accepts, from gguf-py's own reader."""
    tensors = [t for t in GGUFReader(path).tensors if keep(t.name)]
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def test_gguf_report_counts_bits_both_ways(bundled_gguf):
    path = bundled_gguf("tiny-llama", "Q4_K_M", imatrix=True)
    report = inspect_gguf(path)
    assert report["format"] == "gguf" and report["architecture"] == "llama" and report["file_type"] == "Q4_K_M"
    assert report["bpw"]["file"] == pytest.approx(_bits(path, lambda n: True), rel=1e-12)
    repeating = _bits(path, lambda n: n.endswith(".weight") and n not in ("token_embd.weight", "output.weight"))
    assert report["bpw"]["repeating_layers"] == pytest.approx(repeating, rel=1e-12)
    assert report["bpw"]["repeating_layers"] < report["bpw"]["file"]  # the Q6_K output is left out
    assert {n: h["type"] for n, h in report["head"].items()} == {"token_embd.weight": "Q4_K", "output.weight": "Q6_K"}
    assert [layer["layer"] for layer in report["layers"]] == [0, 1, 2, 3]
    for layer in report["layers"]:
        i = layer["layer"]
        assert layer["bpw"] == pytest.approx(_bits(path, lambda n, i=i: n.startswith(f"blk.{i}.")), rel=1e-12)
    reader = GGUFReader(path)
    assert sum(v["elements"] for v in report["types"].values()) == sum(int(t.n_elements) for t in reader.tensors)
    assert report["parameters"] == sum(math.prod(int(d) for d in t.shape) for t in reader.tensors)
    assert report["quantize"]["imatrix.entries_count"] > 0


def test_cli_inspect_gguf_text_and_json(bundled_gguf):
    path = bundled_gguf("tiny-qwen2", "Q4_K_M")
    runner = CliRunner()
    text = runner.invoke(main, ["inspect", str(path)])
    assert text.exit_code == 0, text.output
    assert "over the repeating layers" in text.output and "blk.3" in text.output
    assert "(tied: also the output)" in text.output  # tiny-qwen2 ties its embeddings
    report = json.loads(runner.invoke(main, ["inspect", str(path), "--json"]).output)
    assert set(report["head"]) == {"token_embd.weight"}
    assert report["bpw"]["file"] == pytest.approx(_bits(path, lambda n: True), rel=1e-12)


def test_cli_inspect_truncated_gguf_is_one_error_line(bundled_gguf, tmp_path):
    path = bundled_gguf("tiny-llama", "Q8_0")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:1000])
    result = CliRunner().invoke(main, ["inspect", str(cut)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "cut.gguf" in lines[0], result.output


def test_cli_inspect_vocab_only_gguf(tmp_path):
    import gguf

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "no tensors" in result.output
    assert json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)["tensors"] == 0
