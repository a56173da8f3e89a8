"""Quantization algorithms on tensors (no I/O): ggml block codecs, RTN and GPTQ (gptq.py), and later AWQ."""

from quantkit.quant import (  # noqa: F401  (registers the codecs)
    ggml_float,
    ggml_iq1,
    ggml_iq2,
    ggml_iq3,
    ggml_iq4,
    ggml_kquants,
    ggml_legacy,
)
from quantkit.quant.codec import CODECS, Codec, get_codec

__all__ = ["CODECS", "Codec", "get_codec"]
