"""tests/recipe's shared run: the small recipe of mini_recipe.py, run once per session."""

import subprocess

import pytest
from mini_recipe import MINI_RECIPE, run_command, run_env


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory):
    """(recipe, run dir, statistics cache, log) of MINI_RECIPE run once with the local executor."""
    root = tmp_path_factory.mktemp("mini-run")
    recipe = root / "mini.yaml"
    recipe.write_text(MINI_RECIPE)
    run_dir, cache = root / "whole", root / "cache"
    done = subprocess.run(run_command(recipe, run_dir), env=run_env(cache), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return recipe, run_dir, cache, done.stderr
