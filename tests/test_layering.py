"""The house rules of DESIGN.md, checked on the import graph: algorithms and architectures know no output
format, formats share only the common interfaces, and a format is one package or module under formats/."""

import ast
from pathlib import Path

import quantkit

ROOT = Path(quantkit.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("quantkit")}


def _package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p) for p in (ROOT / package).rglob("*.py")}


def test_architectures_and_algorithms_know_no_format():
    for package in ("arch", "quant", "plan"):
        for module, imports in _package_imports(package).items():
            assert not any(i.startswith("quantkit.formats") for i in imports), (module, imports)


def test_quant_does_no_io():
    for module, imports in _package_imports("quant").items():
        outside = {i for i in imports if i not in ("quantkit.quant", "quantkit.errors")
                   and not i.startswith("quantkit.quant.")}
        assert not outside, (module, outside)


def test_the_gguf_format_uses_only_shared_interfaces():
    shared = ("quantkit.formats.gguf", "quantkit.formats.overrides", "quantkit.arch", "quantkit.calib",
              "quantkit.errors", "quantkit.model",
              "quantkit.output", "quantkit.plan", "quantkit.progress", "quantkit.quant", "quantkit.source",
              "quantkit.tokenizer")
    for module, imports in _package_imports("formats/gguf").items():
        outside = {i for i in imports if not i.startswith(shared) and i not in ("quantkit", "quantkit.formats")}
        assert not outside, (module, outside)
