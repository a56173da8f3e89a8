"""Batch runs: a recipe (YAML: models x variants, shared calibration and evaluation, publishing settings) run
into a resumable run directory by a local or Ray executor. schema.py reads and validates recipes; runner.py
orders the tasks and records them (state.py); tasks.py is what workers execute (executors.py); plan.py is the dry
run."""

from quantkit.recipe.plan import describe_run
from quantkit.recipe.runner import RunSettings, run_recipe
from quantkit.recipe.schema import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "RunSettings", "describe_run", "load_recipe", "run_recipe"]
