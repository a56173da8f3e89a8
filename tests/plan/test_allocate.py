import itertools
import random

import pytest

from quantkit.errors import ConfigError
from quantkit.plan.allocate import Budget, BudgetError, Option, allocate, pareto_front


def _brute_force(groups, budget):
    best = None
    for combo in itertools.product(*groups.values()):
        if sum(o.nbytes for o in combo) <= budget:
            cost = sum(o.cost for o in combo)
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_exact_optimum(seed):
    rng = random.Random(seed)
    groups = {f"g{i}": [Option(f"s{j}", rng.randrange(1, 60), rng.random()) for j in range(rng.randrange(1, 5))]
              for i in range(6)}
    floor = sum(min(o.nbytes for o in opts) for opts in groups.values())
    top = sum(max(o.nbytes for o in opts) for opts in groups.values())
    for budget in (floor, (floor + top) // 2, floor + 7, top):
        chosen = allocate(groups, budget, resolution=1 << 20)  # unit of one byte: no rounding
        assert sum(o.nbytes for o in chosen.values()) <= budget
        assert sum(o.cost for o in chosen.values()) == pytest.approx(_brute_force(groups, budget))


def test_coarse_resolution_never_exceeds_the_budget():
    rng = random.Random(7)
    groups = {f"g{i}": [Option(f"s{j}", rng.randrange(1000, 90000), rng.random()) for j in range(6)]
              for i in range(40)}
    floor = sum(min(o.nbytes for o in opts) for opts in groups.values())
    for extra in (1, 999, 123456, 10**6):
        chosen = allocate(groups, floor + extra, resolution=64)
        assert sum(o.nbytes for o in chosen.values()) <= floor + extra


def test_pareto_front_drops_dominated_options():
    options = [Option("a", 10, 1.0), Option("b", 12, 1.5), Option("c", 14, 0.5), Option("d", 14, 0.7)]
    assert [o.scheme for o in pareto_front(options)] == ["a", "c"]


def test_budget_below_the_smallest_mix_is_refused():
    with pytest.raises(BudgetError, match="below the smallest mix, 30 bytes"):
        allocate({"a": [Option("x", 10, 1.0)], "b": [Option("y", 20, 1.0)]}, 29)


def test_budget_options():
    assert Budget.from_options(target_bpw=4).label == "4.00bpw"
    assert Budget.from_options(target_size="20 GB").size == 20 * 10**9
    fit = Budget.from_options(fit_vram="24GiB", ctx=32768, gpus=2)
    assert (fit.vram, fit.label, fit.option) == (24 << 30, "24GiBx2-ctx32768", "--fit-vram 24GiB --ctx 32768 --gpus 2")
    assert Budget.from_options() is None
    with pytest.raises(ConfigError, match="give one budget"):
        Budget.from_options(target_bpw=4, target_size="1GB")
    with pytest.raises(ConfigError, match="bits per weight"):
        Budget.from_options(target_bpw=0)
