"""A real `quantkit run` variant layout, made once from the bundled tiny-qwen2: Q8_0 and Q4_K_M GGUFs and a
compressed-tensors w4g128 folder (RTN: data-free), each in its variant directory with variant.json, and the eval
report of all three (small settings). Session-scoped: built only when a publish test asks."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantkit.bundled import model_path

MODEL = "tiny-qwen2"
RECIPE = """\
models:
  tiny-qwen2:
    source: tiny-qwen2
    variants: [Q8_0, Q4_K_M, ct-w4g128]
eval: {ctx: 128, windows: 4, mc_items: 8}
"""


@dataclass
class Run:
    root: Path

    def variant(self, name: str) -> Path:
        return self.root / MODEL / name

    @property
    def report(self) -> dict:
        return json.loads((self.root / MODEL / "eval" / "report.json").read_text())


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Run:
    from quantkit import convert as api
    from quantkit.evaluation.report import write_report
    from quantkit.evaluation.runner import evaluate

    root = tmp_path_factory.mktemp("run")
    made = tmp_path_factory.mktemp("made")
    targets = {"Q8_0": "gguf:Q8_0", "Q4_K_M": "gguf:Q4_K_M", "ct-w4g128": "ct:w4g128"}
    written = api.convert(model_path(MODEL), list(targets.values()), made, name=MODEL, threads=2)
    # A source folder whose README carries a license in its front matter (the Q4_K_M variant inherits it).
    licensed = tmp_path_factory.mktemp("licensed-source")
    (licensed / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a model\n")
    extra = {
        "Q8_0": {"base_model": None, "license": "mit", "source": str(model_path(MODEL)), "tags": ["demo"]},
        "Q4_K_M": {"base_model": "example/tiny-qwen2-base", "license": None, "source": str(licensed),
                   "tags": ["demo", "qwen2"]},
        "ct-w4g128": {"base_model": "example/tiny-qwen2-base", "license": None, "source": str(model_path(MODEL)),
                      "tags": []},
    }
    artifacts = []
    for (variant, to), (path, _plan) in zip(targets.items(), written, strict=True):
        folder = root / MODEL / variant
        folder.mkdir(parents=True)
        artifact = folder / path.name
        shutil.move(path, artifact)
        artifacts.append(artifact)
        fmt = to.split(":")[0]
        info = {"recipe": "demo.yaml", "model": MODEL, "variant": variant, "to": to, "format": fmt,
                "artifact": artifact.name, "files": [artifact.name],
                "command": f"quantkit convert {MODEL} --to {to} -o {folder}", "eval_ctx": 128, **extra[variant]}
        (folder / "variant.json").write_text(json.dumps(info, indent=1))
    (root / "recipe.yaml").write_text(RECIPE)
    report = evaluate(model_path(MODEL), artifacts, ctx=128, max_windows=4, mc_items=8, threads=2)
    write_report(report, root / MODEL / "eval")
    return Run(root)
