import json
import os
import re

import pytest

from quantkit.evaluation import report as report_mod
from quantkit.evaluation.report import pareto_front, write_report

GIB = 1 << 30


def _variant(name, fmt, qtype, backend, size_gib, ppl, dppl, sigma, kld, top1, dp, mc, vram_gib, saving):
    size = int(size_gib * GIB)
    return {
        "name": name, "path": f"/models/{name}", "format": fmt, "type": qtype, "backend": backend,
        "ppl": ppl, "delta_ppl_pct": dppl, "delta_ppl_pct_2sigma": sigma,
        "kld": {"mean": kld, "median": kld / 2, "p99": kld * 12, "max": kld * 150},
        "top1_pct": top1, "delta_p_mean": dp, "mc": mc,
        "size_bytes": size, "bpw": size * 8 / 1.54e9,
        "vram": {"weights": size, "kv_cache": 7_340_032, "compute": 301_989_888,
                 "total": size + 7_340_032 + 301_989_888},
        "vram_saving_pct": saving, "seconds": 12.3,
    }


@pytest.fixture
def report():
    baseline = _variant("qwen2-1.5b-BF16", "hf", "BF16", "torch", 2.88, 9.4213, None, None, 0.0, 100.0, 0.0,
                        {"items": 400, "acc": 0.4625, "acc_norm": 0.4875}, 2.88, 0.0)
    baseline["kld"] = {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0}
    variants = [
        _variant("qwen2-1.5b-Q4_K_M", "gguf", "Q4_K_M", "llama.cpp", 0.92, 9.71234, 3.0871, 0.4123, 0.031234,
                 91.234, -0.01234, {"items": 400, "acc": 0.455, "acc_norm": 0.4725}, 0.92, 59.87),
        _variant("qwen2-1.5b-Q8_0", "gguf", "Q8_0", "llama.cpp", 1.53, 9.42891, 0.0807, 0.0413, 0.000812,
                 98.765, -0.00051, {"items": 400, "acc": 0.4625, "acc_norm": 0.485}, 1.53, 40.12),
        _variant("qwen2-1.5b-Q3_K_S", "gguf", "Q3_K_S", "llama.cpp", 0.71, 10.93871, 16.1054, None, 0.121877,
                 82.5, -0.04567, None, 0.71, 67.33),
        _variant("qwen2-1.5b-FP8", "hf", "FP8", "torch", 1.60, 9.44512, 0.2511, 0.0921, 0.004012,
                 96.125, -0.00213, {"items": 400, "acc": 0.46, "acc_norm": 0.4875}, 1.60, 37.71),
        _variant("qwen2-1.5b-Q6_K", "gguf", "Q6_K", "llama.cpp", 1.18, 9.43555, 0.1425, 0.0611, 0.002987,
                 97.512, -0.00123, {"items": 400, "acc": 0.4625, "acc_norm": 0.4875}, 1.18, 49.91),
    ]
    return {
        "quantkit_version": "0.1.0", "date": "2026-11-24T02:30:00+00:00",
        "settings": {"baseline": "/models/qwen2-1.5b", "text": "wikitext-2 test, raw", "ctx": 256, "windows": 300,
                     "scored_tokens": 38400, "tasks": "eval/tasks/stdlib_nextline.jsonl", "mc_items": 400,
                     "ppl_method": "llama.cpp: non-overlapping ctx-token windows, first half context, second half "
                                   "scored", "device": "cpu"},
        "baseline": baseline,
        "variants": variants,
    }


def _parse_table(markdown: str) -> list[dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    header, rule, body = split[0], split[1], split[2:]
    assert all(set(cell) == {"-"} for cell in rule)
    return [dict(zip(header, row, strict=True)) for row in body]


def _num(cell: str) -> float | None:
    return None if cell == "—" else float(cell)


def _rounded(value, digits):
    return None if value is None else round(value, digits)


def test_write_report_files_and_json(report, tmp_path):
    out = tmp_path / "runs" / "eval"  # made on demand, parents included
    paths = write_report(report, out)
    assert paths == {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "quality_vs_vram.png"}
    assert all(p.is_file() for p in paths.values())
    assert sorted(p.name for p in out.iterdir()) == ["quality_vs_vram.png", "report.json", "report.md"]
    text = paths["json"].read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == report


def test_markdown_table_matches_json(report, tmp_path):
    markdown = write_report(report, tmp_path)["markdown"].read_text()
    s = report["settings"]
    for fact in (s["baseline"], s["text"], s["ppl_method"], s["tasks"], s["device"], "0.1.0", report["date"],
                 "300 windows of 256 tokens", "38400 scored tokens"):
        assert fact in markdown

    rows = _parse_table(markdown)
    expected = [report["baseline"]] + sorted(report["variants"], key=lambda v: -v["size_bytes"])
    assert len(rows) == 1 + len(report["variants"])
    assert [r["Variant"] for r in rows] == [expected[0]["name"] + " (baseline)"] + [v["name"] for v in expected[1:]]

    header = list(rows[0])
    size_col = next(h for h in header if h.startswith("Size ("))
    vram_col = next(h for h in header if h.startswith("VRAM @256 ("))
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    size_div = units[re.search(r"\((\w+)\)", size_col).group(1)]
    vram_div = units[re.search(r"\((\w+)\)", vram_col).group(1)]
    assert size_div == vram_div == GIB  # the numbers are ~1-3 GiB
    for row, v in zip(rows, expected, strict=True):
        assert row["Format/type"] == f"{v['format']}/{v['type']}"
        assert row["Backend"] == v["backend"]
        assert _num(row[size_col]) == round(v["size_bytes"] / size_div, 2)
        assert _num(row["bpw"]) == round(v["bpw"], 2)
        assert _num(row[vram_col]) == round(v["vram"]["total"] / vram_div, 2)
        assert _num(row["VRAM saving %"]) == round(v["vram_saving_pct"], 1)
        assert _num(row["PPL"]) == round(v["ppl"], 3)
        delta, _, sigma = row["ΔPPL % (±2σ)"].partition("±")
        assert _num(delta.strip()) == _rounded(v["delta_ppl_pct"], 2)
        assert (_num(sigma.strip()) if sigma else None) == _rounded(v["delta_ppl_pct_2sigma"], 2)
        assert _num(row["KLD mean (nats)"]) == round(v["kld"]["mean"], 5)
        assert _num(row["KLD p99 (nats)"]) == round(v["kld"]["p99"], 5)
        assert _num(row["Top-1 %"]) == round(v["top1_pct"], 2)
        assert _num(row["Δp mean (pp)"]) == round(v["delta_p_mean"], 4)
        if v["mc"] is None:
            assert row["MC acc / acc_norm"] == "—"
        else:
            acc, acc_norm = row["MC acc / acc_norm"].split(" / ")
            assert (_num(acc), _num(acc_norm)) == (round(v["mc"]["acc"], 3), round(v["mc"]["acc_norm"], 3))


def test_plot_is_a_png_of_the_expected_size(report, tmp_path):
    from matplotlib.image import imread

    image = imread(write_report(report, tmp_path)["plot"])
    assert image.shape[:2] == (600, 1440)  # 12x5 inches at 120 dpi


def test_pareto_front():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 1), (0.5, 9)]
    # (3, 4) loses to (2, 3), (5, 1) to (4, 1); the two equal (2, 3) do not dominate each other.
    assert pareto_front(points) == [6, 0, 1, 4, 3]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.0)]) == [0]


def test_failed_plot_leaves_no_files(report, tmp_path, monkeypatch):
    def broken(report):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_mod, "render_plot", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(report, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_files(report, tmp_path, monkeypatch):
    paths = write_report(report, tmp_path)
    before = {key: p.read_bytes() for key, p in paths.items()}
    report["variants"][0]["ppl"] = 99.0
    replace = os.replace
    calls = []

    def replace_once_then_fail(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError("disk gone")
        replace(src, dst)

    monkeypatch.setattr(report_mod.os, "replace", replace_once_then_fail)
    with pytest.raises(OSError, match="disk gone"):
        write_report(report, tmp_path)
    # Each final name holds a whole file, old or new, and no temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quality_vs_vram.png", "report.json", "report.md"]
    assert json.loads(paths["json"].read_text()) == report
    assert paths["markdown"].read_bytes() == before["markdown"]
    assert paths["plot"].read_bytes() == before["plot"]


def test_report_json_is_valid_json_with_nan_as_null(report, tmp_path):
    report["variants"][0]["delta_ppl_pct_2sigma"] = float("nan")  # undefined: a single window
    report["variants"][1]["kld"]["max"] = float("inf")

    def no_constant(name):
        raise AssertionError(f"report.json holds {name}, which is not JSON")

    saved = json.loads(write_report(report, tmp_path)["json"].read_text(), parse_constant=no_constant)
    assert saved["variants"][0]["delta_ppl_pct_2sigma"] is None and saved["variants"][1]["kld"]["max"] is None


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_report_files_get_the_umask_permissions(report, tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = write_report(report, tmp_path)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in paths.values()} == dict.fromkeys(
        ["report.json", "report.md", "quality_vs_vram.png"], 0o666 & ~umask)


def test_kld_and_delta_p_headers_carry_units(report, tmp_path):
    markdown = write_report(report, tmp_path)["markdown"].read_text()
    header = list(_parse_table(markdown)[0])
    assert {"KLD mean (nats)", "KLD p99 (nats)", "Δp mean (pp)"} <= set(header)
    assert "KLD in nats" in markdown and "percentage points (pp)" in markdown
