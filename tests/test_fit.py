"""`quantkit plan`: the catalog (configs only), every variant's memory at a context, what fits, and the CLI."""

import json

import pytest
from click.testing import CliRunner

from quantkit import catalog
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.fit import shipped_plan, variants
from quantkit.plan.vram import parse_bytes, vram_gguf

GIB = 2**30


@pytest.mark.parametrize("name, params", [("deepseek-ai/DeepSeek-R1", 671.03e9), ("DEEPSEEK-V3", 671.03e9),
                                          ("deepseek-r1-distill-qwen-7b", 7.62e9),
                                          ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.78e9),
                                          ("DeepSeek-R1-Distill-Qwen-14B", 14.77e9),
                                          ("DeepSeek-R1-Distill-Qwen-32B", 32.76e9),
                                          ("DeepSeek-R1-Distill-Llama-8B", 8.03e9),
                                          ("DeepSeek-R1-Distill-Llama-70B", 70.55e9)])
def test_catalog_names_and_sizes(name, params):
    model = catalog.load(name)
    total = sum(e.n_elements for e in shipped_plan(model.arch).entries)  # MTP layer left out
    assert total == pytest.approx(params, rel=2e-3)  # the model cards round to 3 or 4 digits


def test_unknown_catalog_name_lists_the_names():
    with pytest.raises(QuantkitError, match="DeepSeek-R1-Distill-Llama-70B"):
        catalog.load("DeepSeek-R2")


@pytest.mark.parametrize("text, value", [("24GiB", 24 * GIB), ("24GB", 24 * 10**9), ("80G", 80 * 10**9),
                                         ("1.5 GiB", int(1.5 * GIB)), ("512MiB", 512 * 2**20)])
def test_sizes(text, value):
    assert parse_bytes(text) == value


def test_qwen_7b_kv_cache_and_the_best_fitting_variant():
    rows = {r.name: r for r in variants(catalog.load("DeepSeek-R1-Distill-Qwen-7B"), "gguf", 32768, "f16",
                                        8 * GIB)}
    # llama.cpp: 28 layers x (K + V) x 4 kv heads x 128 x 2 bytes x 32768 cells
    assert all(r.kv_bytes == 28 * 2 * 4 * 128 * 2 * 32768 for r in rows.values())
    assert rows["gguf:Q4_K_M"].bpw == pytest.approx(4.91, abs=0.01)
    best = [r for r in rows.values() if r.best]
    assert len(best) == 1 and best[0].fits
    fixed = [r for r in rows.values() if r.spec != "auto"]
    assert all(not r.fits or r.bpw <= best[0].bpw for r in fixed)
    assert not rows["gguf:BF16"].fits and rows["gguf:Q2_K"].fits
    # what gguf:auto --fit-vram would fill: more bits than the best fixed type, never over the budget
    auto = rows["gguf:auto --fit-vram"]
    assert auto.fits and not auto.best and best[0].bpw < auto.bpw and auto.total_bytes <= 8 * GIB
    assert 8 * GIB - auto.total_bytes < 64 << 10


@pytest.mark.parametrize("fmt", ["ct", "gptq"])
def test_folder_auto_row_fills_the_vram_between_the_fixed_schemes(fmt):
    """`{fmt}:auto --fit-vram` as the plan shows it: the budget convert would give the mix (vLLM's accounting), more
    bits than the best fixed scheme that fits, and refused (fits False) below every linear's smallest scheme."""
    rows = {r.name: r for r in variants(catalog.load("DeepSeek-R1-Distill-Qwen-7B"), fmt, 32768, "bf16",
                                        10 * GIB)}
    auto, w4, w8 = rows[f"{fmt}:auto --fit-vram"], rows[f"{fmt}:w4g128"], rows[f"{fmt}:w8"]
    assert w4.fits and not w8.fits and w4.best and not auto.best
    assert auto.fits and w4.bpw < auto.bpw < w8.bpw
    assert 0 <= 10 * GIB - auto.total_bytes < 1 << 20
    small = {r.name: r for r in variants(catalog.load("DeepSeek-R1-Distill-Qwen-7B"), fmt, 32768, "bf16", 8 * GIB)}
    assert not small[f"{fmt}:auto --fit-vram"].fits


def test_r1_mla_cache_and_gpus():
    r1 = catalog.load("DeepSeek-R1")
    one = {r.name: r for r in variants(r1, "gguf", 32768, "f16", 141 * 10**9, gpus=1)}
    two = {r.name: r for r in variants(r1, "gguf", 32768, "f16", 141 * 10**9, gpus=2)}
    # MLA: llama.cpp caches the latent (512) + rope key (64) per layer and token, no V; 61 layers (no MTP)
    assert one["gguf:Q4_K_M"].kv_bytes == 61 * (512 + 64) * 2 * 32768
    assert not one["gguf:Q2_K"].fits and two["gguf:Q2_K"].fits and two["gguf:Q2_K"].best
    assert two["gguf:Q2_K"].total_bytes - one["gguf:Q2_K"].total_bytes == one["gguf:Q2_K"].compute_bytes


def test_folder_formats_and_kv_types(model_cache):
    rows = variants(catalog.load("DeepSeek-R1-Distill-Llama-8B"), "ct", 8192, "fp8", 24 * GIB)
    assert [r.name for r in rows] == ["as shipped (bf16)", "ct:w8", "ct:w4g128", "ct:auto --fit-vram"]
    assert rows[1].kv_bytes == 32 * 2 * 8 * 128 * 8192  # vLLM: exactly ctx positions, one byte per value
    with pytest.raises(QuantkitError, match="vLLM's KV cache"):
        variants(catalog.load("DeepSeek-R1-Distill-Llama-8B"), "ct", 8192, "q8_0", 24 * GIB)
    with pytest.raises(QuantkitError, match="llama.cpp's KV cache types"):
        variants(catalog.load("DeepSeek-R1-Distill-Llama-8B"), "gguf", 8192, "fp8", 24 * GIB)


def test_cli_json_table_and_refusals(model_cache, tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["plan", "DeepSeek-R1-Distill-Qwen-7B", "--vram", "8GiB", "--ctx", "16384", "--json"])
    assert done.exit_code == 0, done.output
    rows = json.loads(done.output)
    assert {"name", "bpw", "weights_bytes", "kv_bytes", "compute_bytes", "total_bytes", "fits"} <= set(rows[0])
    table = runner.invoke(main, ["plan", "deepseek-ai/deepseek-r1-distill-qwen-7b", "--vram", "8GiB"])
    assert table.exit_code == 0 and "<- best" in table.output
    impossible = runner.invoke(main, ["plan", "DeepSeek-R1", "--vram", "24GiB"])
    assert impossible.exit_code != 0 and "nothing fits 1 x 24GiB" in impossible.output
    assert "needs 2" in impossible.output  # the smallest figure (Q2_K, over 200 GiB)
    listed = runner.invoke(main, ["plan", "--list"])
    assert "deepseek-ai/DeepSeek-V3" in listed.output


def test_a_local_folder_and_a_gguf_file(model_cache, tmp_path):
    from quantkit.convert import convert
    from quantkit.model import Model
    from quantkit.source.gguf_file import GGUFFile

    src = model_cache("llama")
    with Model(src) as model:
        rows = variants(model, "gptq", 512, "bf16", GIB)
    assert [r.name for r in rows] == ["as shipped (bf16)", "gptq:w8", "gptq:w4g128", "gptq:auto --fit-vram"]
    ((path, _),) = convert(src, ["gguf:Q8_0"], tmp_path / "m.gguf")
    gguf = GGUFFile(path)
    (row,) = variants(gguf, "gguf", 512, "f16", GIB)
    assert row.weights_bytes == vram_gguf(gguf, 512).weights and row.fits


def test_measured_quality_from_an_eval_report(tmp_path):
    report = {"variants": [{"format": "gguf", "type": "Q4_K_M", "kld": {"mean": 0.0068, "p99": 0.031}, "ppl": 37.9},
                           {"format": "gguf", "type": "auto (--target-bpw 4.5)", "kld": {"mean": 0.001}},
                           {"format": "hf", "type": "compressed-tensors w4g128", "kld": {"mean": 0.02}, "ppl": 40.0}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    result = CliRunner().invoke(main, ["plan", "tiny-llama", "--vram", "10MiB", "--ctx", "256", "--json",
                                       "--report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert (rows["gguf:Q4_K_M"]["kld_mean"], rows["gguf:Q4_K_M"]["kld_p99"], rows["gguf:Q4_K_M"]["ppl"]) == \
        (0.0068, 0.031, 37.9)
    assert rows["gguf:Q6_K"]["kld_mean"] is None
    result = CliRunner().invoke(main, ["plan", "tiny-llama", "--format", "ct", "--json", "--report",
                                       str(tmp_path / "report.json")])
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["ct:w4g128"]["ppl"] == 40.0 and rows["ct:w8"]["ppl"] is None
    (tmp_path / "bad.json").write_text("{")
    result = CliRunner().invoke(main, ["plan", "tiny-llama", "--report", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "not a quantkit eval report.json" in result.output
