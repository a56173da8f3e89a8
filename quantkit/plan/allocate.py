"""Automatic mixed precision: the scheme of every group that minimises the summed measured cost under a byte budget.

A multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into `resolution` units:
every candidate's extra bytes over its group's smallest candidate are rounded UP to whole units, so the chosen mix
never exceeds the budget (it can miss a mix that fits only without the rounding: at most one unit per group).
Each group's candidates are first reduced to their Pareto front (a candidate with more bytes and no lower cost
than another is never worth buying). Format-neutral: groups and schemes are names, costs and bytes numbers;
quantkit.calib.sensitivity measures them and the formats turn the choice into a plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from quantkit.errors import ConfigError
from quantkit.plan.vram import parse_bytes


class BudgetError(ConfigError):
    """A budget below what the smallest candidates of every group need."""


@dataclass(frozen=True)
class Option:
    scheme: str
    nbytes: int
    cost: float


def pareto_front(options: Sequence[Option]) -> list[Option]:
    """The options no other option beats on both bytes and cost, by increasing bytes (decreasing cost)."""
    front: list[Option] = []
    for option in sorted(options, key=lambda o: (o.nbytes, o.cost)):
        if not front or option.cost < front[-1].cost:
            front.append(option)
    return front


def allocate(groups: Mapping[str, Sequence[Option]], budget: int, resolution: int = 1 << 14) -> dict[str, Option]:
    """group -> chosen option, minimising the summed cost with the summed bytes <= budget."""
    if any(not options for options in groups.values()):
        raise ConfigError("every group needs at least one candidate scheme")
    fronts = {name: pareto_front(options) for name, options in groups.items()}
    floor = sum(front[0].nbytes for front in fronts.values())
    if floor > budget:
        raise BudgetError(f"{budget:,} bytes is below the smallest mix, {floor:,} bytes")
    spare = budget - floor
    if spare >= sum(front[-1].nbytes - front[0].nbytes for front in fronts.values()):
        return {name: front[-1] for name, front in fronts.items()}  # everything at its best: no choice to make
    unit = max(1, math.ceil(spare / resolution))
    capacity = spare // unit
    best = np.zeros(capacity + 1)  # best[c]: least cost of the groups so far within c units of extra bytes
    choices = []
    for front in fronts.values():
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int16)
        for index, option in enumerate(front):
            weight = math.ceil((option.nbytes - front[0].nbytes) / unit)
            if weight > capacity:
                break
            candidate = best[:capacity + 1 - weight] + option.cost
            better = candidate < new[weight:]
            new[weight:][better] = candidate[better]
            pick[weight:][better] = index
        best = new
        choices.append(pick)
    chosen, c = {}, capacity
    for (name, front), pick in zip(reversed(list(fronts.items())), reversed(choices), strict=True):
        option = front[pick[c]]
        chosen[name] = option
        c -= math.ceil((option.nbytes - front[0].nbytes) / unit)
    return {name: chosen[name] for name in fronts}


@dataclass(frozen=True)
class Budget:
    """What an automatic mix must fit: bits per weight over every tensor (--target-bpw), the written file's size
    (--target-size), or `gpus` GPUs of `vram` bytes each at context `ctx` by the runtime's own accounting
    (--fit-vram). Exactly one is set; `given` is the size as the user wrote it."""

    bpw: float | None = None
    size: int | None = None
    vram: int | None = None
    given: str = ""
    ctx: int = 4096
    gpus: int = 1
    kv_type: str | None = None

    @classmethod
    def from_options(cls, target_bpw: float | None = None, target_size: str | None = None,
                     fit_vram: str | None = None, ctx: int = 4096, gpus: int = 1,
                     kv_type: str | None = None) -> Budget | None:
        given = [n for n, v in (("--target-bpw", target_bpw), ("--target-size", target_size),
                                ("--fit-vram", fit_vram)) if v is not None]
        if not given:
            return None
        if len(given) > 1:
            raise ConfigError(f"give one budget, not {' and '.join(given)}")
        if target_bpw is not None:
            if not 0 < target_bpw <= 32:
                raise ConfigError(f"--target-bpw {target_bpw} is not a number of bits per weight (0 < bpw <= 32)")
            return cls(bpw=float(target_bpw))
        if target_size is not None:
            return cls(size=parse_bytes(target_size), given=target_size.replace(" ", ""))
        if ctx < 1 or gpus < 1:
            raise ConfigError("--ctx and --gpus must be positive")
        return cls(vram=parse_bytes(fit_vram), given=fit_vram.replace(" ", ""), ctx=ctx, gpus=gpus, kv_type=kv_type)

    @property
    def label(self) -> str:
        """For file names: 4.00bpw, 20GB, 24GiB-ctx32768, 80GBx2-ctx8192."""
        if self.bpw is not None:
            return f"{self.bpw:.2f}bpw"
        if self.size is not None:
            return self.given
        return self.given + (f"x{self.gpus}" if self.gpus > 1 else "") + f"-ctx{self.ctx}"

    def refusal(self, target: str, unit: str, floor: int, limit: int, n_elements: int) -> str:
        """The error for a budget whose `limit` (tensor bytes it leaves) is below `floor` (the smallest mix's), with
        the smallest achievable figure in the budget's own terms: what the budget spends besides tensors (a file's
        header, the KV cache and compute buffers) is its total less `limit`."""
        if self.bpw is not None:
            least = f"{8 * floor / n_elements:.2f} bpw"
        elif self.size is not None:
            least = f"{floor + self.size - limit:,} bytes"
        else:
            per_gpu = (floor + self.gpus * self.vram - limit) / self.gpus
            least = (f"{per_gpu / (1 << 30):.2f} GiB" if per_gpu >= 1 << 30 else f"{per_gpu / (1 << 20):.1f} MiB") + \
                f" per GPU at ctx {self.ctx}"
        return (f"{self.option} is below the smallest mix {target} can make of this model ({least}, every free {unit} "
                "at its smallest candidate); raise the budget" + (" or shorten --ctx" if self.vram is not None else ""))

    @property
    def option(self) -> str:
        """The command-line options it came from, for messages."""
        if self.bpw is not None:
            return f"--target-bpw {self.bpw:g}"
        if self.size is not None:
            return f"--target-size {self.given}"
        return f"--fit-vram {self.given} --ctx {self.ctx}" + (f" --gpus {self.gpus}" if self.gpus > 1 else "")
