"""Importance matrices written by the real llama-imatrix (tests/data/llama_imatrix, made by
eval/make_llama_imatrix.py): quantkit reads them (GGUF and legacy .dat), computes the same statistics on the
same text, and `convert` gives the tensor data the llama-quantize binary gave, with and without them."""

import json
from pathlib import Path

import pytest
import torch

from quantkit.bundled import MODEL_NAMES, MODELS_DIR
from quantkit.calib import Imatrix, collect_imatrix
from quantkit.calib.data import tokenize_file
from quantkit.model import Model
from quantkit.testing.ggml_reference import tensor_data_digest

DATA = Path(__file__).parents[1] / "data" / "llama_imatrix"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
REGENERATE = "the bundled model changed since the golden files were made: run python -m eval.make_llama_imatrix"


def _llama_imatrix(name: str) -> Imatrix:
    return Imatrix.load(DATA / f"{name}.imatrix.gguf")


def _check_model_unchanged(name: str) -> None:
    from eval.make_llama_imatrix import weights_digest

    assert weights_digest(MODELS_DIR / name) == MANIFEST["models"][name]["weights_sha256"], REGENERATE


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_statistics_as_llama_imatrix_on_the_same_text(name):
    from eval.make_llama_imatrix import calibration_text, text_digest

    _check_model_unchanged(name)
    text = calibration_text()
    if text_digest(text) != MANIFEST["calibration_sha256"]:
        pytest.skip("this Python's stdlib gives a different calibration text than the golden files used")
    theirs = _llama_imatrix(name)
    with Model(MODELS_DIR / name) as model:
        ours = collect_imatrix(model, tokenize_file(model, text), ctx=MANIFEST["ctx"], max_chunks=MANIFEST["chunks"])
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (8, 128)
    assert ours.sums.keys() == theirs.sums.keys()
    # llama.cpp sums float32 activations from its own kernels; in the MoE model its rounding also routes one of
    # 2048 tokens to another expert, which moves that layer's and the next layers' sums a little.
    # Measured worst |ours - theirs| / |theirs|: qwen2 8.5e-5, llama 9.9e-5, deepseek 5.8e-3.
    moe = bool(json.loads((MODELS_DIR / name / "config.json").read_text()).get("n_routed_experts"))
    bound, count_slack = (1e-2, 2) if moe else (1e-3, 0)
    for key in theirs.sums:
        a, b = ours.counts[key], theirs.counts[key]
        assert a.sum() == b.sum() and (a - b).abs().max() <= count_slack, (key, a.tolist(), b.tolist())
        # flat: llama.cpp keeps one row for batched heads (attn_k_b/attn_v_b) where quantkit keeps one per head
        a, b = ours.sums[key].reshape(-1), theirs.sums[key].reshape(-1)
        assert (a - b).norm() / b.norm() < bound, key


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_convert_equals_the_llama_quantize_cli(name, with_imatrix, bundled_gguf):
    """The llama-quantize binary itself, run on the F32 GGUF (tests/interop compares with its library call).
    quantkit's files are the session's shared conversions (with imatrix: of DATA / NAME.imatrix.gguf)."""
    _check_model_unchanged(name)
    expected = MANIFEST["models"][name]["llama_quantize_imatrix" if with_imatrix else "llama_quantize"]
    assert bundled_gguf.bundled_imatrix(name) == DATA / f"{name}.imatrix.gguf"
    written = bundled_gguf.many(name, list(expected), imatrix=with_imatrix)
    got = {type_name: tensor_data_digest(path) for type_name, path in written.items()}
    assert got == expected


def test_legacy_dat_from_llama_imatrix_matches_its_gguf():
    dat, gguf = Imatrix.load(DATA / "tiny-qwen2.imatrix.dat"), _llama_imatrix("tiny-qwen2")
    assert dat.chunk_count == gguf.chunk_count == 8
    a, b = dat.importances(), gguf.importances()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0, msg=key)
