"""Whole files byte-exact with llama.cpp's quantizer: quantkit converting a bundled model straight from its
checkpoint gives the same tensor bytes as llama-quantize run on the F32 GGUF of the same model, with and
without the same importance matrix. The file types that need an imatrix (IQ1 / IQ2 / IQ3_XXS / IQ3_XS) are refused
without one by both, and with one give the same type tables on every model and the same files on some; llama.cpp
computes quantkit's logits from two of them."""

import numpy as np
import pytest
import torch
from test_llama_cpp import assert_logits_match_quantkit_forward

from quantkit import convert as api
from quantkit.bundled import MODEL_NAMES, MODELS_DIR
from quantkit.calib import Imatrix, collect_imatrix
from quantkit.errors import ConfigError
from quantkit.formats.gguf.mixtures import file_type
from quantkit.model import Model
from quantkit.source.gguf_file import GGUFFile
from quantkit.testing.ggml_reference import llama_quantize, llama_quantize_types

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.interop

TYPES = ["Q4_K_M", "Q3_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "IQ3_S"]  # IQ3_M: IQ3_S and Q4_K tensors
IMATRIX_ONLY = ["IQ3_XS"]  # refused without one (attn_q / attn_k are IQ3_XXS)
IQ1_IQ2 = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS"]  # IQ3_XXS: attn_q / attn_k are IQ2_S
TRAINED = [n for n in MODEL_NAMES if (MODELS_DIR / n / "config.json").is_file()]
# Both quantizers are slowest at these types (ggml also builds its IQ1 / IQ2 tables: ~40 s once per process, which
# tests/quant's comparisons with ggml need too), so whole files of the smallest model at each, and of the MoE one
# (experts with importances of their own) at the two with the fewest bits. IQ3_M (IQ3_S and Q4_K tensors, compared
# on every model above) rides along: one more type in the same pass, a second or two.
IQ_FILES = {"tiny-llama": [*IQ1_IQ2, "IQ3_M"], "tiny-deepseek": ["IQ1_S", "IQ2_XXS"]}
IQ_CASES = [(name, t) for name, types in IQ_FILES.items() if name in TRAINED for t in types]


@pytest.fixture(scope="module")
def prepare(tmp_path_factory, bundled_gguf):
    """prepare(name) -> (name, a scratch folder with quantkit's own importance matrix of the model (collected here:
    the llama-imatrix files are tests/calib's), its F32 GGUF (the session's shared file)), once per model. quantkit's
    files of every type are converted here in one pass over the checkpoint each (with that imatrix; plain where
    FILE_CASES compares plain files). Shared by model_files and the tests that take a model by name."""
    made = {}

    def get(name: str) -> tuple:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            with Model(MODELS_DIR / name) as model:
                tokens = torch.randint(3, model.arch.vocab_size, (4 * 128,),
                                       generator=torch.Generator().manual_seed(0))
                collect_imatrix(model, tokens, ctx=128, dataset="random").save(out / "imatrix.gguf")
            if (name, TYPES[0], False) in FILE_CASES:
                bundled_gguf.many(name, TYPES)
            bundled_gguf.many(name, TYPES + IMATRIX_ONLY, imatrix=out / "imatrix.gguf")
            made[name] = name, out, bundled_gguf(name, "F32")
        return made[name]

    return get


@pytest.fixture(scope="module", params=TRAINED or [pytest.param(None, marks=pytest.mark.skip("no bundled models"))])
def model_files(request, prepare):
    return prepare(request.param)


def _tensors(path):
    g = GGUFFile(path)
    return {name: (g.type_name(name), np.array(g.data(name))) for name in g.tensors}


# With an imatrix (what published files use) on every model; without one, where ggml runs its other quantizers
# (compared per codec in tests/quant), on tiny-llama.
FILE_CASES = [(name, t, True) for name in TRAINED for t in TYPES] + [
    ("tiny-llama", t, False) for t in TYPES if "tiny-llama" in TRAINED]


@pytest.mark.parametrize(("name", "type_name", "with_imatrix"), FILE_CASES)
def test_tensor_data_equals_llama_quantize(prepare, bundled_gguf, name, type_name, with_imatrix):
    _compare_files(prepare(name), bundled_gguf, type_name, with_imatrix)


@pytest.mark.parametrize("type_name", IMATRIX_ONLY)
def test_imatrix_only_file_types_equal_llama_quantize(model_files, bundled_gguf, type_name):
    _compare_files(model_files, bundled_gguf, type_name, True)


def _importance(path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in Imatrix.load(path).importances().items()}


@pytest.mark.parametrize(("name", "type_name"), IQ_CASES)
def test_iq_file_types_equal_llama_quantize(prepare, bundled_gguf, name, type_name):
    _iq_files(prepare(name), bundled_gguf)
    _compare_files(prepare(name), bundled_gguf, type_name, True)


@pytest.mark.skipif("tiny-llama" not in TRAINED, reason="tiny-llama is not trained")
@pytest.mark.parametrize("type_name", ["IQ1_S", "IQ2_XXS"])
def test_llama_cpp_logits_of_iq_files_match_quantkit_forward(prepare, bundled_gguf, type_name):
    gguf = _iq_files(prepare("tiny-llama"), bundled_gguf)[type_name]
    assert_logits_match_quantkit_forward(MODELS_DIR / "tiny-llama", gguf, type_name)


def _iq_files(model_files, bundled_gguf) -> dict:
    """quantkit's IQ_FILES of the model with the module's imatrix: all in one pass over its checkpoint, on first use."""
    name, out, _ = model_files
    return bundled_gguf.many(name, IQ_FILES[name], imatrix=out / "imatrix.gguf")


@pytest.mark.parametrize("type_name", IMATRIX_ONLY + IQ1_IQ2)
def test_plan_types_equal_llama_quantize_and_both_refuse_without_imatrix(model_files, type_name):
    name, out, f32 = model_files
    ftype = file_type(type_name).ftype
    with pytest.raises(ConfigError, match="--imatrix"):
        api.convert(MODELS_DIR / name, [f"gguf:{type_name}"], out, dry_run=True)
    with pytest.raises(RuntimeError, match="llama_model_quantize failed"):
        llama_quantize(f32, out / "refused.gguf", ftype)
    [(_, plan)] = api.convert(MODELS_DIR / name, [f"gguf:{type_name}"], out, dry_run=True,
                              imatrix=out / "imatrix.gguf")
    theirs = llama_quantize_types(f32, ftype, importance=_importance(out / "imatrix.gguf"))
    assert dict(theirs) == plan.schemes


def _compare_files(model_files, bundled_gguf, type_name, with_imatrix):
    name, out, f32 = model_files
    imatrix = out / "imatrix.gguf" if with_imatrix else None
    # quantkit converting the checkpoint: shared with the other modules (plain), cached for this one (imatrix)
    ours = bundled_gguf(name, type_name, imatrix=imatrix or False)
    importance = _importance(imatrix) if imatrix else None
    theirs = out / "theirs.gguf"
    llama_quantize(f32, theirs, file_type(type_name).ftype, nthread=2, importance=importance)
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    differ = [n for n in a if a[n][0] != b[n][0] or not np.array_equal(a[n][1], b[n][1])]
    assert not differ, f"{len(differ)} tensors differ from llama-quantize, e.g. {differ[:3]}"
