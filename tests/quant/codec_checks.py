"""What the codec test modules share: heavy-tailed test rows and the skips for the compiled codecs and for ggml."""

import pytest
import torch

from quantkit.quant import kernels
from quantkit.testing import ggml_reference

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="compiled codecs not built")
needs_ggml = pytest.mark.skipif(not ggml_reference.available(),
                                reason="llama-cpp-python's libggml-base is not installed (the byte-exact reference)")


def student_t2(gen: torch.Generator, shape: tuple[int, int]) -> torch.Tensor:
    """StudentT(2) from a seeded generator: z / sqrt(chi2_2 / 2), chi2_2 = -2 log U."""
    z = torch.randn(shape, generator=gen)
    u = torch.rand(shape, generator=gen).clamp_min(1e-30)
    return z / torch.sqrt(-torch.log(u))
