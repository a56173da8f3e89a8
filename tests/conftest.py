import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from quantkit.quant import kernels
from quantkit.testing.factory import make_tiny_model

LLAMA_IMATRIX_DIR = Path(__file__).parent / "data" / "llama_imatrix"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Tiny model folders, made once per session; a test that damages one must work on `copy_model`."""
    root = tmp_path_factory.mktemp("models")
    made: dict[tuple, Path] = {}

    def get(preset: str, **kwargs) -> Path:
        key = (preset, tuple(sorted(kwargs.items())))
        if key not in made:
            name = preset + "".join(f"-{k}" for k, v in sorted(kwargs.items()) if v)
            made[key] = make_tiny_model(root / name, preset, **kwargs)
        return made[key]

    return get


@pytest.fixture
def copy_model(model_cache, tmp_path):
    def copy(preset: str, **kwargs) -> Path:
        dst = tmp_path / "model"
        shutil.copytree(model_cache(preset, **kwargs), dst)
        return dst

    return copy


@pytest.fixture
def unrouted_expert_model(copy_model) -> Path:
    """The FP8 DeepSeek-V3 test model with expert 3 of layer 1 made unreachable (a large negative score-correction
    bias): the zero-token expert every calibrated method must give its fallback."""
    from safetensors.torch import load_file, save_file

    folder = copy_model("deepseek_v3", fp8=True)
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name][3] = -1e4
            save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def bundled_imatrix_file(name: str) -> Path:
    """The bundled importance matrix of a bundled model: the one the real llama-imatrix wrote
    (tests/data/llama_imatrix, eval/make_llama_imatrix.py), which the golden digests were made with."""
    return LLAMA_IMATRIX_DIR / f"{name}.imatrix.gguf"


class BundledGGUFs:
    """GGUF files of the bundled models, converted once per session and shared by every module that needs
    them (interop, byte-exactness, eval, VRAM, lm-eval). `get(model, type)` returns a cached path,
    `many(model, types)` a {type: path} dict, converting the missing types in one `convert` call (one read of
    the source). `imatrix`: False (none), True (the bundled llama-imatrix file of that model) or a path.

    The files are shared: a test that damages one (truncates, rewrites, renames) must copy it first."""

    def __init__(self, root: Path):
        self.root = root
        self.made: dict[tuple[str, str, str], Path] = {}

    @staticmethod
    def bundled_imatrix(name: str) -> Path:
        return bundled_imatrix_file(name)

    def _imatrix(self, name: str, imatrix: bool | str | Path) -> tuple[Path | None, str]:
        if imatrix is True:
            return self.bundled_imatrix(name), "llama-imatrix"
        if not imatrix:
            return None, "plain"
        path = Path(imatrix).resolve()
        return path, "imatrix-" + str(abs(hash(str(path))))

    def many(self, name: str, types: list[str] | tuple[str, ...], imatrix: bool | str | Path = False) -> dict:
        from quantkit import convert as api
        from quantkit.bundled import model_path

        path, tag = self._imatrix(name, imatrix)
        missing = [t for t in dict.fromkeys(types) if (name, t, tag) not in self.made]
        if missing:
            out = self.root / f"{name}-{tag}"
            out.mkdir(parents=True, exist_ok=True)
            written = api.convert(model_path(name), [f"gguf:{t}" for t in missing], out, imatrix=path,
                                  name=name, force=True)
            for t, (file, plan) in zip(missing, written, strict=True):
                assert plan.target == t, (t, plan.target)
                self.made[(name, t, tag)] = file
        return {t: self.made[(name, t, tag)] for t in types}

    def get(self, name: str, type_name: str, imatrix: bool | str | Path = False) -> Path:
        return self.many(name, [type_name], imatrix)[type_name]

    __call__ = get


@pytest.fixture(scope="session")
def bundled_gguf(tmp_path_factory) -> BundledGGUFs:
    """Session cache of bundled-model GGUF files: `bundled_gguf(model, type, imatrix=False)` -> Path,
    `bundled_gguf.many(model, types, imatrix=False)` -> {type: Path}. See BundledGGUFs."""
    return BundledGGUFs(tmp_path_factory.mktemp("bundled-gguf"))


class Killed(Exception):
    """Stands for kill -9 in the middle of a layerwise run."""


@pytest.fixture
def killed_at_layer(monkeypatch):
    """`with killed_at_layer(k): convert(...)`: quantkit's layerwise runs in the body die as layer k is finished
    (None: after the last one), after that layer's shard is written; the body must end in Killed. run_layers is the
    real one again after the block."""
    import quantkit.calib.layerwise as layerwise

    real = layerwise.run_layers

    @contextmanager
    def killed(layer: int | None):
        def dying(*args, **kwargs):
            for index in real(*args, **kwargs):
                if index == layer:
                    raise Killed
                yield index
            raise Killed

        monkeypatch.setattr(layerwise, "run_layers", dying)
        try:
            with pytest.raises(Killed):
                yield
        finally:
            monkeypatch.setattr(layerwise, "run_layers", real)

    return killed


@pytest.fixture(params=["torch", "kernel"])
def codec_impl(request, monkeypatch):
    """Runs a codec test once per implementation of the CPU codecs: the torch ones and the compiled kernels
    (skipped where they are not built). CUDA tensors always take the torch codecs."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("quantkit's compiled codecs are not built (python setup.py build_ext --inplace)")
    monkeypatch.setenv(kernels.ENV, request.param)
    return request.param
