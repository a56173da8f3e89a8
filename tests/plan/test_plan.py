"""Plans are data: they print, save as JSON and load back equal; a broken plan file is a clear error."""

import json

import pytest

from quantkit import convert as api
from quantkit.errors import ConfigError
from quantkit.plan import Plan, bits_per_weight, format_plan


def test_plan_round_trips_through_json(model_cache, tmp_path):
    [(_, plan)] = api.convert(model_cache("llama"), ["gguf:Q4_K_M"], tmp_path / "m.gguf", dry_run=True)
    assert plan.format == "gguf" and plan.target == "Q4_K_M"
    saved = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(saved)
    assert loaded == plan and loaded.schemes == plan.schemes
    assert loaded.bpw == plan.bpw == bits_per_weight(plan.total_bytes, plan.n_elements)
    assert json.loads(saved.read_text())["bpw"] == plan.bpw
    assert format_plan(loaded) == format_plan(plan) and "Q4_K_M" in format_plan(plan)


def test_broken_plan_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such plan file"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(ConfigError, match="plan version"):
        Plan.load(tmp_path / "old.json")
    (tmp_path / "partial.json").write_text(json.dumps({"version": 1, "format": "gguf"}))
    with pytest.raises(ConfigError, match="not a quantkit plan"):
        Plan.load(tmp_path / "partial.json")


def test_cli_saves_the_plan_it_prints(model_cache, tmp_path):
    from click.testing import CliRunner

    from quantkit.cli import main

    result = CliRunner().invoke(main, ["convert", str(model_cache("llama")), "--to", "gguf:Q8_0", "--dry-run",
                                       "--save-plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "p.json")
    assert plan.target == "Q8_0" and f"{plan.bpw:.4f} bpw" in result.output
