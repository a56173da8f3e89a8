import pytest

from quantkit.quant import kernels


@pytest.fixture(params=["torch", "kernel"])
def codec_impl(request, monkeypatch):
    """Runs a codec test once per implementation of the CPU codecs: the torch ones and the compiled kernels
    (skipped where they are not built). CUDA tensors always take the torch codecs."""
    if request.param == "kernel" and not kernels.available():
        pytest.skip("quantkit's compiled codecs are not built (python setup.py build_ext --inplace)")
    monkeypatch.setenv(kernels.ENV, request.param)
    return request.param
