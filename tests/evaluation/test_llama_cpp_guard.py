"""The AMX guard: on a CPU with AMX, llama.cpp models are loaded without the extra buffer types (llama.cpp #20824
segfaults on the first decode); this machine has no AMX, so the detection is forced."""

import logging

import pytest
import torch

from quantkit import convert as api
from quantkit.evaluation import llama_cpp_guard
from quantkit.evaluation.variants import LlamaCppVariant

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    from quantkit.testing.factory import make_tiny_model

    root = tmp_path_factory.mktemp("guard")
    [(path, _)] = api.convert(make_tiny_model(root / "model", "llama"), ["gguf:Q4_K_M"], root / "q4.gguf")
    return path


def test_cpu_has_amx_reads_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not llama_cpp_guard.cpu_has_amx(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    assert llama_cpp_guard.cpu_has_amx(info)
    assert not llama_cpp_guard.cpu_has_amx(tmp_path / "missing")


def test_amx_cpu_loads_without_extra_buffer_types(q4_gguf, monkeypatch, caplog):
    monkeypatch.setattr(llama_cpp_guard, "cpu_has_amx", lambda: True)
    with caplog.at_level(logging.WARNING):
        variant = LlamaCppVariant(q4_gguf, n_ctx=64, threads=1)
    try:
        # The params llama_model_load_from_file received, and the Llama object's own copy.
        assert variant.llm._model.params.use_extra_bufts is False
        assert variant.llm.model_params.use_extra_bufts is False
        assert torch.isfinite(variant.logits(torch.arange(3, 19)[None])).all()  # decodes
    finally:
        variant.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "AMX" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    # Only while loading: a later Llama gets llama.cpp's defaults again.
    assert llama_cpp.llama_model_default_params().use_extra_bufts is True


def test_no_amx_keeps_llama_cpp_defaults(q4_gguf, monkeypatch, caplog):
    monkeypatch.setattr(llama_cpp_guard, "cpu_has_amx", lambda: False)
    with caplog.at_level(logging.WARNING):
        variant = LlamaCppVariant(q4_gguf, n_ctx=64, threads=1)
    try:
        assert variant.llm._model.params.use_extra_bufts is True
    finally:
        variant.close()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
