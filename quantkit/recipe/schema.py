"""Recipes: one YAML file naming models, the calibration and evaluation they share, and the variants to make of
each (any `--to` spec with convert's options), plus publishing settings.

Validated whole before any work. The YAML is read as a node tree (PyYAML's compose), not as plain data, so every
error names the file, the line and the key: an unknown key, a value of the wrong type, a format or spec convert
would refuse, a model that is not there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import ConfigError, QuantkitError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name on every filesystem


class RecipeError(QuantkitError):
    """A recipe that cannot be run: the message starts with FILE:LINE and names the key."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # its folder in the run directory
    path: str  # an HF folder (relative to the recipe), a bundled model name, or a catalog name (dry runs only)
    base_model: str | None = None  # the Hugging Face repo it was made from, for model cards
    license: str | None = None
    line: int = 0


@dataclass(frozen=True)
class Calibration:
    text: Path | None = None  # None: the bundled calibration split
    samples: int = 128  # GPTQ/AWQ samples of `ctx` tokens
    ctx: int = 512
    imatrix_chunks: int | None = None  # None: every chunk of the text
    imatrix_ctx: int = 512
    sensitivity_samples: int = 8  # automatic mixes' measurement
    sensitivity_method: str | None = None  # output or proxy (gguf:auto); None: the format's own
    damp: float | None = None


@dataclass(frozen=True)
class Evaluation:
    enabled: bool = True
    ctx: int = 512
    windows: int | None = None
    mc_items: int = 400
    backend: str = "auto"
    text: Path | None = None
    tasks: Path | None = None


@dataclass(frozen=True)
class Budget:
    target_bpw: float | None = None
    target_size: str | None = None
    fit_vram: str | None = None
    ctx: int = 4096
    gpus: int = 1
    kv_type: str | None = None

    def build(self):
        from quantkit.plan.allocate import Budget as Allocation

        return Allocation.from_options(self.target_bpw, self.target_size, self.fit_vram, self.ctx, self.gpus,
                                       self.kv_type)


@dataclass(frozen=True)
class Variant:
    name: str  # its folder under the model's, and what --only and `quantkit publish` name it by
    to: str  # FORMAT:SPEC as convert takes it
    imatrix: bool = True  # GGUF targets: use the model's importance matrix (computed once per model)
    tensor_types: tuple[str, ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    keep_first_dense: bool = False
    fix_mix: bool = False
    split_max_size: str | None = None
    budget: Budget = field(default_factory=Budget)
    models: tuple[str, ...] | None = None  # None: every model of the recipe
    tags: tuple[str, ...] = ()
    line: int = 0

    @property
    def format(self) -> str:
        return self.to.split(":", 1)[0]

    def applies_to(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class Publish:
    repo_id: str | None = None  # a template: {model}, {variant}, {format} are filled in
    tags: tuple[str, ...] = ()
    private: bool = False
    max_shard_size: str = "48GB"


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    description: str
    models: tuple[ModelEntry, ...]
    calibration: Calibration
    evaluation: Evaluation
    variants: tuple[Variant, ...]
    publish: Publish
    sha256: str  # of the file's bytes, recorded in the run directory

    def model_variants(self, model: str) -> list[Variant]:
        return [v for v in self.variants if v.applies_to(model)]


# ---- reading the node tree --------------------------------------------------------------------------------------

class _Reader:
    """Typed access to YAML nodes, each error naming file, line and the key's path (variants[2].to)."""

    def __init__(self, path: Path):
        self.path = path
        self._constructor = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | None, key: str, message: str) -> RecipeError:
        line = node.start_mark.line + 1 if node is not None else 1
        return RecipeError(f"{self.path}:{line}: {key}: {message}")

    def mapping(self, node: yaml.Node, key: str, allowed: dict[str, Callable]) -> dict[str, Any]:
        """Every key of a mapping node read by its reader; unknown or repeated keys refused."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, key, f"expected a mapping of {', '.join(allowed)}, got {_kind(node)}")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            name = self.scalar(key_node, key)
            where = f"{key}.{name}" if key else str(name)
            if name not in allowed:
                raise self.fail(key_node, where, f"unknown key (known here: {', '.join(allowed)})")
            if name in out:
                raise self.fail(key_node, where, "given twice")
            out[name] = allowed[name](value_node, where)
        return out

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, f"expected a single value, got {_kind(node)}")
        return self._constructor.construct_object(node)

    def sequence(self, node: yaml.Node, key: str, item: Callable) -> list:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, key, f"expected a list, got {_kind(node)}")
        return [item(child, f"{key}[{i}]") for i, child in enumerate(node.value)]

    # typed scalars
    def string(self, node, key) -> str | None:
        value = self.scalar(node, key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(node, key, f"expected text, got {value!r}")
        return str(value)

    def integer(self, node, key, minimum: int = 1) -> int | None:
        value = self.scalar(node, key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(node, key, f"expected a whole number, got {value!r}")
        if value < minimum:
            raise self.fail(node, key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, node, key) -> float | None:
        value = self.scalar(node, key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(node, key, f"expected a number, got {value!r}")
        return float(value)

    def boolean(self, node, key) -> bool:
        value = self.scalar(node, key)
        if not isinstance(value, bool):
            raise self.fail(node, key, f"expected true or false, got {value!r}")
        return value

    def strings(self, node, key) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode):  # one item may be written without brackets
            return (self.required_string(node, key),)
        return tuple(self.sequence(node, key, self.required_string))

    def required_string(self, node, key) -> str:
        value = self.string(node, key)
        if not value:
            raise self.fail(node, key, "must not be empty")
        return value

    def name(self, node, key) -> str:
        value = self.required_string(node, key)
        if not NAME_PATTERN.match(value):
            raise self.fail(node, key, f"{value!r} is not a usable folder name (letters, digits, . _ -)")
        return value

    def file(self, node, key) -> Path | None:
        value = self.string(node, key)
        if value is None:
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.path.parent / path
        if not path.is_file():
            raise self.fail(node, key, f"no such file {path}")
        return path


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value) if node is not None else "nothing"


def _node_line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


# ---- sections ---------------------------------------------------------------------------------------------------

def _model(r: _Reader, node: yaml.Node, key: str) -> ModelEntry:
    fields = r.mapping(node, key, {"name": r.name, "path": r.required_string, "base_model": r.required_string,
                                   "license": r.required_string})
    if "name" not in fields and "path" not in fields:
        raise r.fail(node, key, "give the model's name (a bundled model) or its path")
    path = fields.get("path") or fields["name"]
    name = fields.get("name") or Path(path).name
    if not NAME_PATTERN.match(name):
        raise r.fail(node, f"{key}.name", f"{name!r} is not a usable folder name: give `name:`")
    entry = ModelEntry(name, path, fields.get("base_model"), fields.get("license"), _node_line(node))
    try:
        locate_model(r.path, entry)
    except ConfigError as exc:
        raise r.fail(node, f"{key}.path" if "path" in fields else f"{key}.name", str(exc)) from None
    return entry


def locate_model(recipe_path: Path, entry: ModelEntry) -> Path | str:
    """An HF folder's path, or the catalog's repo id for a model known by its config only."""
    from quantkit import catalog
    from quantkit.bundled import resolve_model

    given = Path(entry.path).expanduser()
    for candidate in (given if given.is_absolute() else recipe_path.parent / given, resolve_model(entry.path)):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    repo = catalog.find(entry.path)
    if repo is not None:
        return repo
    raise ConfigError(f"no model at {entry.path!r}: give an HF folder with config.json (relative to the recipe), a "
                      f"bundled model ({', '.join(_bundled())}) or a catalog name (`quantkit plan --list`)")


def _bundled() -> list[str]:
    from quantkit.bundled import MODEL_NAMES

    return list(MODEL_NAMES)


def _calibration(r: _Reader, node: yaml.Node, key: str) -> Calibration:
    from quantkit.formats import SENSITIVITY_METHODS

    def method(n, k):
        value = r.required_string(n, k)
        if value not in SENSITIVITY_METHODS:
            raise r.fail(n, k, f"unknown sensitivity method {value!r} ({', '.join(SENSITIVITY_METHODS)})")
        return value

    return Calibration(**r.mapping(node, key, {
        "text": r.file, "samples": r.integer, "ctx": r.integer, "imatrix_chunks": r.integer,
        "imatrix_ctx": r.integer, "sensitivity_samples": r.integer, "sensitivity_method": method,
        "damp": r.number}))


def _evaluation(r: _Reader, node: yaml.Node, key: str) -> Evaluation:
    if isinstance(node, yaml.ScalarNode):  # `evaluation: false` skips it
        return Evaluation(enabled=r.boolean(node, key))

    def backend(n, k):
        value = r.required_string(n, k)
        if value not in ("auto", "torch", "llama.cpp"):
            raise r.fail(n, k, f"unknown backend {value!r} (auto, torch, llama.cpp)")
        return value

    return Evaluation(**r.mapping(node, key, {
        "enabled": r.boolean, "ctx": r.integer, "windows": r.integer,
        "mc_items": lambda n, k: r.integer(n, k, minimum=0), "backend": backend, "text": r.file,
        "tasks": r.file}))


BUDGET_KEYS = ("target_bpw", "target_size", "fit_vram", "ctx", "gpus", "kv_type")


def _variant(r: _Reader, node: yaml.Node, key: str) -> Variant:
    from quantkit.formats import parse_target
    from quantkit.formats.overrides import parse_override

    readers = {"name": r.name, "to": r.required_string, "imatrix": r.boolean, "tensor_types": r.strings,
               "output_tensor_type": r.required_string, "token_embedding_type": r.required_string,
               "pure": r.boolean, "keep_first_dense": r.boolean, "fix_mix": r.boolean,
               "split_max_size": r.required_string, "models": r.strings, "tags": r.strings,
               "target_bpw": r.number, "target_size": r.required_string, "fit_vram": r.required_string,
               "ctx": r.integer, "gpus": r.integer, "kv_type": r.required_string}
    fields = r.mapping(node, key, readers)
    if "to" not in fields:
        raise r.fail(node, key, "every variant needs `to:` (FORMAT:SPEC, e.g. gguf:Q4_K_M)")
    child = {k: v for k, v in zip((r.scalar(k, key) for k, _ in node.value), (v for _, v in node.value),
                                  strict=True)}
    try:
        target = parse_target(fields["to"])
    except ConfigError as exc:
        raise r.fail(child["to"], f"{key}.to", str(exc)) from None
    for i, text in enumerate(fields.get("tensor_types", ())):
        try:
            parse_override(text)
        except ConfigError as exc:
            raise r.fail(child["tensor_types"], f"{key}.tensor_types[{i}]", str(exc)) from None
    budget = Budget(**{k: fields.pop(k) for k in BUDGET_KEYS if k in fields})
    try:
        allocation = budget.build()
    except ConfigError as exc:
        raise r.fail(node, key, str(exc)) from None
    is_auto = target.spec.split("-")[0] == "auto"
    if is_auto and allocation is None:
        raise r.fail(child["to"], f"{key}.to", f"{target} needs a budget: target_bpw, target_size or fit_vram")
    if allocation is not None and not is_auto:
        raise r.fail(node, key, f"a budget applies to automatic mixes only ({target.format}:auto), not {target}")
    fields["to"] = str(target)
    fields.setdefault("name", _default_name(target, allocation))
    return Variant(**fields, budget=budget, line=_node_line(node))


def _default_name(target, allocation) -> str:
    """The variant's name when the recipe gives none: the GGUF type (Q4_K_M), or FORMAT-spec (GPTQ-w4g128)."""
    spec = f"{target.spec}-{allocation.label}" if allocation is not None else target.spec
    return spec if target.format == "gguf" else f"{target.format.upper()}-{spec}"


def _publish(r: _Reader, node: yaml.Node, key: str) -> Publish:
    def repo_template(n, k):
        value = r.required_string(n, k)
        try:
            filled = value.format(model="m", variant="v", format="f")
        except (KeyError, IndexError, ValueError) as exc:
            raise r.fail(n, k, f"{value!r}: only {{model}}, {{variant}} and {{format}} can be filled in ({exc})") \
                from None
        if filled.count("/") != 1:
            raise r.fail(n, k, f"{value!r} is not USER/NAME")
        return value

    fields = r.mapping(node, key, {"repo_id": repo_template, "tags": r.strings, "private": r.boolean,
                                   "max_shard_size": r.required_string})
    return Publish(**fields)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; a RecipeError names the file, line and key of the first problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    r = _Reader(path)
    try:
        root = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise RecipeError(f"{path}:1: the recipe is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise RecipeError(f"{path}:{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if root is None:
        raise RecipeError(f"{path}:1: the recipe is empty; it needs `models:` and `variants:`")
    fields = r.mapping(root, "", {
        "name": r.name, "description": r.string,
        "models": lambda n, k: r.sequence(n, k, lambda c, ck: _model(r, c, ck)),
        "calibration": lambda n, k: _calibration(r, n, k), "evaluation": lambda n, k: _evaluation(r, n, k),
        "variants": lambda n, k: r.sequence(n, k, lambda c, ck: _variant(r, c, ck)),
        "publish": lambda n, k: _publish(r, n, k)})
    for section in ("models", "variants"):
        if not fields.get(section):
            raise r.fail(root, section, f"the recipe needs at least one entry in `{section}:`")
    models, variants = fields["models"], fields["variants"]
    _unique(r, [(m.name, m.line) for m in models], "models", "name")
    _unique(r, [(v.name, v.line) for v in variants], "variants", "name")
    known = {m.name for m in models}
    for i, v in enumerate(variants):
        for name in v.models or ():
            if name not in known:
                raise RecipeError(f"{path}:{v.line}: variants[{i}].models: no model named {name!r} in this recipe "
                                  f"({', '.join(sorted(known))})")
    return Recipe(path=path.resolve(), name=fields.get("name") or path.stem, description=fields.get("description")
                  or "", models=tuple(models), calibration=fields.get("calibration") or Calibration(),
                  evaluation=fields.get("evaluation") or Evaluation(), variants=tuple(variants),
                  publish=fields.get("publish") or Publish(), sha256=hashlib.sha256(data).hexdigest())


def _unique(r: _Reader, names: list[tuple[str, int]], section: str, key: str) -> None:
    seen: dict[str, int] = {}
    for i, (name, line) in enumerate(names):
        if name in seen:
            raise RecipeError(f"{r.path}:{line}: {section}[{i}].{key}: {name!r} is used twice (also line "
                              f"{seen[name]}); give each a distinct `name:`")
        seen[name] = line
