"""quantkit eval: the metrics are right on known cases (self-comparison, lossless F32), the two backends agree,
quality orders the llama.cpp types, and bad input is refused."""

import json
import shutil

import pytest
from click.testing import CliRunner

from quantkit import convert as api
from quantkit.bundled import MODEL_NAMES, model_path, textsets
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.evaluation.runner import evaluate
from quantkit.evaluation.variants import has_llama_cpp
from quantkit.testing.factory import make_tiny_model

CTX = 256
WINDOWS = 12  # spread over the held-out text: 12 * 127 = 1524 scored tokens
MC_ITEMS = 4  # the self-comparison's multiple-choice items (each costs about two windows per variant; the CLI test
# scores 20): equal for the copy and in range, whatever the count
LADDER = ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"]

needs_llama_cpp = pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module", params=MODEL_NAMES)
def ggufs(request, bundled_gguf):
    return request.param, bundled_gguf.many(request.param, ["F32", *LADDER])


def _run(name, targets, **kwargs):
    kwargs = {"ctx": CTX, "max_windows": WINDOWS, "mc_items": 0, **kwargs}
    return evaluate(model_path(name), targets, **kwargs)


def test_baseline_against_itself_is_zero_and_f32_is_lossless(ggufs, tmp_path):
    name, files = ggufs
    same = shutil.copytree(model_path(name), tmp_path / f"{name}-copy")
    report = _run(name, [same, files["F32"]], backend="torch", mc_items=MC_ITEMS)
    base, (copy, f32) = report["baseline"], report["variants"]
    assert copy["kld"] == {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0}
    assert copy["top1_pct"] == 100.0 and copy["delta_ppl_pct"] == 0.0 and copy["mc"] == base["mc"]
    assert abs(f32["ppl"] / base["ppl"] - 1) < 1e-3  # the must-show bound: 0.1%
    assert f32["kld"]["mean"] < 1e-6 and f32["top1_pct"] > 99.9
    assert report["settings"]["scored_tokens"] == WINDOWS * (CTX // 2 - 1)
    assert base["mc"]["items"] == MC_ITEMS and 0 <= base["mc"]["acc"] <= 1


@needs_llama_cpp
def test_backends_agree(ggufs):
    name, files = ggufs
    torch_report = _run(name, [files["F32"], files["Q4_K_M"]], backend="torch")
    llama_report = _run(name, [files["F32"], files["Q4_K_M"]], backend="llama.cpp")
    base = torch_report["baseline"]["ppl"]
    (t_f32, t_q4), (l_f32, l_q4) = torch_report["variants"], llama_report["variants"]
    assert l_f32["backend"] == "llama.cpp" and t_f32["backend"] == "torch"
    assert abs(t_f32["ppl"] / base - 1) < 1e-3 and abs(l_f32["ppl"] / base - 1) < 1e-3
    assert abs(l_q4["ppl"] / t_q4["ppl"] - 1) < 5e-3


def test_kld_grows_along_the_ladder(ggufs):
    name, files = ggufs
    report = _run(name, [files[t] for t in LADDER], backend="torch")
    klds = [v["kld"]["mean"] for v in report["variants"]]
    assert klds == sorted(klds) and klds[0] > 0, dict(zip(LADDER, klds, strict=True))
    sizes = [v["size_bytes"] for v in report["variants"]]
    assert sizes == sorted(sizes, reverse=True)
    assert all(0 < v["vram_saving_pct"] < 100 for v in report["variants"])


def test_vocabulary_mismatch_is_refused(tmp_path):
    other = make_tiny_model(tmp_path / "other", "qwen2", config_overrides={"vocab_size": 640})
    [(gguf, _)] = api.convert(other, ["gguf:Q8_0"], tmp_path / "other.gguf")
    with pytest.raises(QuantkitError, match="vocabulary of 640 tokens, the baseline's has 3072"):
        _run("tiny-qwen2", [gguf], backend="torch")


def test_context_longer_than_text_or_model_is_refused():
    with pytest.raises(QuantkitError, match="fewer than one window"):
        _run("tiny-qwen2", [], text="def f():\n    return 1\n", ctx=CTX)
    with pytest.raises(QuantkitError, match="exceeds the model's context length 2048"):
        _run("tiny-qwen2", [], ctx=4096)


def test_cli_writes_the_report(tmp_path, bundled_gguf):
    gguf = bundled_gguf("tiny-llama", "Q4_K_M")
    text = tmp_path / "text.txt"
    text.write_text(textsets.text("heldout")[:60000])
    result = CliRunner().invoke(main, ["eval", str(gguf), "--baseline", "tiny-llama", "--text", str(text),
                                       "--ctx", "128", "--windows", "8", "--mc-items", "20", "--backend", "torch",
                                       "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["settings"]["text"] == str(text) and report["variants"][0]["type"] == "Q4_K_M"
    assert (tmp_path / "report" / "quality_vs_vram.png").stat().st_size > 10_000
    assert "Q4_K_M" in result.output
    bad = CliRunner().invoke(main, ["eval", str(gguf), "--baseline", "tiny-llama", "--ctx", "99999"])
    assert bad.exit_code == 2 and bad.output.startswith("error:")
