"""The model card: front matter that parses back, the report's numbers at the precision shown, VRAM from the
files, usage for the artifact's runtime, and the same bytes for the same inputs."""

import re

import pytest
import yaml

from quantkit.plan.vram import vram_gguf
from quantkit.publish import render_card
from quantkit.source.gguf_file import GGUFFile

REPO = "alice/tiny-qwen2-Q4_K_M-GGUF"
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end])


def _table(card: str, heading: str) -> dict[str, list[str]]:
    """The first table after `heading`: first cell -> the other cells."""
    section = card[card.index(heading):]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    table = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        table[cells[0]] = cells[1:]
    return table


def _assert_shown(text: str, value: float) -> None:
    """`text` is `value` rounded to the digits it shows (in the unit it names, if any)."""
    number = re.fullmatch(r"([+-]?\d+(?:\.(\d+))?)(?: (\w+))?", text)
    assert number, text
    decimals = len(number.group(2) or "")
    unit = UNITS[number.group(3)] if number.group(3) else 1
    assert abs(float(number.group(1)) - value / unit) <= 0.5 * 10 ** -decimals * 1.000001, (text, value)


def test_front_matter_parses_back(run):
    meta = _front_matter(render_card(run.variant("Q4_K_M"), REPO))
    assert meta["base_model"] == "example/tiny-qwen2-base"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf"
    assert meta["license"] == "apache-2.0"  # from the source folder's README front matter
    assert meta["quantized_by"] == "quantkit"
    assert meta["tags"] == ["gguf", "quantized", "quantkit", "demo", "qwen2"]


def test_front_matter_license_from_variant_json_and_omissions(run):
    q8 = _front_matter(render_card(run.variant("Q8_0"), "alice/x"))
    assert q8["license"] == "mit"
    assert "base_model" not in q8 and "base_model_relation" not in q8
    ct = _front_matter(render_card(run.variant("ct-w4g128"), "alice/y"))
    assert "license" not in ct  # neither variant.json nor the bundled README's (front-matter-less) text has one
    assert ct["library_name"] == "transformers"
    assert ct["tags"][:3] == ["compressed-tensors", "quantized", "quantkit"]


@pytest.mark.parametrize("variant", ["Q4_K_M", "ct-w4g128"])
def test_card_numbers_are_the_reports(run, variant):
    card = render_card(run.variant(variant), REPO)
    report = run.report
    name = _artifact(run, variant).removesuffix(".gguf")
    row = next(r for r in report["variants"] if r["name"] == name)
    table = _table(card, "## Quality against the source model")
    for column, source in ((0, row), (1, report["baseline"])):
        cell = {label: cells[column] for label, cells in table.items()}
        _assert_shown(cell["Perplexity"], source["ppl"])
        delta = cell["ΔPPL %"].split(" ± ")
        _assert_shown(delta[0], source["delta_ppl_pct"])
        if len(delta) > 1:
            _assert_shown(delta[1], source["delta_ppl_pct_2sigma"])
        _assert_shown(cell["KLD mean (nats)"], source["kld"]["mean"])
        _assert_shown(cell["KLD p99 (nats)"], source["kld"]["p99"])
        _assert_shown(cell["Top-1 agreement %"], source["top1_pct"])
        _assert_shown(cell["MC accuracy"], source["mc"]["acc"])
        _assert_shown(cell["MC accuracy (length-normalised)"], source["mc"]["acc_norm"])
        _assert_shown(cell["Size"], source["size_bytes"])
        _assert_shown(cell["Bits per weight"], source["bpw"])
        _assert_shown(cell["VRAM @128 tokens"], source["vram"]["total"])
    assert row["kld"]["mean"] > 0  # a real measurement, not the baseline's zeros


def _artifact(run, variant: str) -> str:
    return next(p.name for p in run.variant(variant).iterdir() if p.name != "variant.json")


def test_card_vram_is_the_files_own(run):
    card = render_card(run.variant("Q4_K_M"), REPO)
    table = _table(card, "## VRAM")
    gguf = GGUFFile(run.variant("Q4_K_M") / "tiny-qwen2-Q4_K_M.gguf")
    for ctx in (4096, 16384, 32768):
        estimate = vram_gguf(gguf, ctx)
        weights, kv, compute, total = table[str(ctx)]
        _assert_shown(weights, estimate.weights)
        _assert_shown(kv, estimate.kv_cache)
        _assert_shown(total, estimate.total)


def test_card_usage_plot_and_provenance(run):
    card = render_card(run.variant("Q4_K_M"), REPO)
    assert f"llama-cli -hf {REPO}:Q4_K_M" in card
    assert "llama-server -m tiny-qwen2-Q4_K_M-GGUF/tiny-qwen2-Q4_K_M.gguf" in card
    assert "![quality vs VRAM](quality_vs_vram.png)" in card
    assert "quantkit convert tiny-qwen2 --to gguf:Q4_K_M" in card
    assert "variants: [Q8_0, Q4_K_M, ct-w4g128]" in card  # the recipe, as run
    assert "SHA256SUMS" in card and "sha256sum -c SHA256SUMS" in card
    ct = render_card(run.variant("ct-w4g128"), "alice/tiny-ct")
    assert "vllm serve alice/tiny-ct" in ct
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-ct"' in ct
    local = render_card(run.variant("Q8_0"))
    assert "llama-server -m tiny-qwen2-Q8_0.gguf" in local and "-hf" not in local


def test_card_is_deterministic(run):
    first = render_card(run.variant("Q4_K_M"), REPO)
    assert render_card(run.variant("Q4_K_M"), REPO) == first
    assert run.report["date"] not in first
