"""Recipe validation: every shipped recipe validates and dry-runs offline; each class of error names the file,
the line and the key."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_every_shipped_recipe_is_found():
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "r1-distill.yaml", "r1-671b.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_validates_and_dry_runs(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.models and recipe.variants
    if path.stem == "r1-671b":  # its dry run (12 s) is the next test's
        return
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    for model in recipe.models:
        assert model.name in result.output
    for variant in recipe.variants:
        assert variant.name in result.output
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_demo_defaults_and_names():
    recipe = load_recipe(RECIPES / "demo.yaml")
    assert [v.name for v in recipe.variants] == ["Q8_0", "Q4_K_M", "Q2_K", "GPTQ-w4g128", "AWQ-w4g128"]
    assert [m.name for m in recipe.models] == ["tiny-qwen2", "tiny-llama", "tiny-deepseek"]
    assert recipe.calibration.imatrix_chunks == 16 and recipe.evaluation.windows == 16


def test_r1_dry_run_plans_from_the_catalog(tmp_path):
    """The 671B recipe sizes every variant from the catalog's config: the four dynamic mixes within 3% of
    Unsloth's published R1 files (131 / 158 / 183 / 212 GiB), all far below the FP8 original (~690 GB)."""
    result = CliRunner().invoke(main, ["run", str(RECIPES / "r1-671b.yaml"), "--dry-run", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert all(v.name in result.output for v in load_recipe(RECIPES / "r1-671b.yaml").variants)
    sizes = {}
    for line in result.output.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] == "todo" and parts[-2] == "GiB":
            sizes[parts[0]] = float(parts[-3])
    unsloth = {"dynamic-IQ1_S": 131, "dynamic-IQ1_M": 158, "dynamic-IQ2_XXS": 183, "dynamic-Q2_K_XL": 212}
    assert {name: round(sizes[name] / gib - 1, 3) for name, gib in unsloth.items()
            if abs(sizes[name] / gib - 1) > 0.03} == {}
    assert sizes["dynamic-Q2_K_XL"] < sizes["Q4_K_M"] < 690e9 / 2**30


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "models:\n  - name: tiny-qwen2\nvariants:\n  - to: gguf:Q8_0\n"


@pytest.mark.parametrize("text, line, key, words", [
    (BASE + "calibraton:\n  samples: 4\n", 5, "calibraton", "unknown key"),
    (BASE + "calibration:\n  samples: many\n", 6, "calibration.samples", "expected a whole number"),
    (BASE + "calibration:\n  samples: 0\n", 6, "calibration.samples", "at least 1"),
    (BASE + "  - to: ggfu:Q4_K_M\n", 5, "variants[1].to", "FORMAT one of gguf"),
    (BASE + "  - to: gguf:Q9_K\n", 5, "variants[1].to", "Q9_K"),
    (BASE + "  - to: gguf:auto\n", 5, "variants[1].to", "needs a budget"),
    (BASE + "  - to: gguf:Q4_K_M\n    target_bpw: 4\n", 5, "variants[1]", "automatic mixes only"),
    (BASE + "  - to: gguf:Q4_K_M\n    tensor_types: [noequals]\n", 6, "variants[1].tensor_types[0]", "REGEX="),
    (BASE + "  - to: gguf:Q4_K_M\n    pure: yes please\n", 6, "variants[1].pure", "true or false"),
    (BASE + "  - to: gguf:Q4_K_M\n    models: [tiny-nothing]\n", 5, "variants[1].models", "no model named"),
    (BASE + "  - to: gguf:Q8_0\n", 5, "variants[1].name", "used twice"),
    ("models:\n  - name: tiny-qwen2\n  - path: /no/such/model\nvariants:\n  - to: gguf:Q8_0\n", 3, "models[1].path",
     "no model at"),
    ("models: tiny-qwen2\nvariants:\n  - to: gguf:Q8_0\n", 1, "models", "expected a list"),
    ("models:\n  - name: tiny-qwen2\n", 1, "variants", "at least one"),
    (BASE + "publish:\n  repo_id: nobody\n", 6, "publish.repo_id", "USER/NAME"),
    (BASE + "evaluation:\n  backend: vllm\n", 6, "evaluation.backend", "unknown backend"),
    (BASE + "calibration:\n  sensitivity_method: guess\n", 6, "calibration.sensitivity_method",
     "unknown sensitivity method"),
    (BASE + "variants: []\n", 5, "variants", "given twice"),
    ("models:\n  - name: [tiny\n", 3, "", "not valid YAML"),
])
def test_schema_errors_name_file_line_and_key(tmp_path, text, line, key, words):
    path = _write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: {key}"), message
    assert words in message


def test_cli_reports_a_schema_error_in_one_line(tmp_path):
    path = _write(tmp_path, BASE + "calibration:\n  sampels: 4\n")
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:6: calibration.sampels: unknown key")


def test_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "calib.txt").write_text("def f():\n    return 1\n" * 50)
    path = _write(tmp_path, BASE + "calibration:\n  text: calib.txt\n")
    assert load_recipe(path).calibration.text == tmp_path / "calib.txt"
    missing = _write(tmp_path, BASE + "calibration:\n  text: nothere.txt\n")
    with pytest.raises(RecipeError, match=r"r.yaml:6: calibration.text: no such file"):
        load_recipe(missing)


def test_auto_variants_command_names_the_sensitivity_settings(tmp_path):
    from quantkit.recipe.runner import ModelRun, convert_options, equivalent_command

    recipe = load_recipe(_write(tmp_path, BASE + "  - to: gguf:auto\n    target_bpw: 4.0\ncalibration:\n"
                                               "  sensitivity_samples: 4\n  sensitivity_method: proxy\n"))
    assert recipe.calibration.sensitivity_method == "proxy"
    auto = recipe.variants[1]
    model = ModelRun("tiny-qwen2", "tiny-qwen2", recipe.models[0], list(recipe.variants), [])
    command = equivalent_command(model, auto, convert_options(recipe, auto))
    assert "--sensitivity-samples 4 --sensitivity-method proxy" in command
    assert "--target-bpw 4.0" in command
