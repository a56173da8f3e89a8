"""IQ1_S / IQ1_M: encoded bytes against ggml's own quantizer (libggml-base via ggml_quantize_chunk), decoding
against gguf-py's numpy dequantizers, and the kernel-only encoding path. ggml builds its IQ1 neighbour tables
on the first call (about half a minute on one core): the byte-exact tests share that one set-up."""

import numpy as np
import pytest
import torch
from codec_checks import needs_ggml, needs_kernels, student_t2
from gguf import GGMLQuantizationType, quants

from quantkit.errors import QuantkitError
from quantkit.quant import get_codec
from quantkit.testing import ggml_reference

TYPES = ["IQ1_S", "IQ1_M"]
WIDE = 1024
NARROW = 256



def _tricky(gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(20, NARROW, generator=gen)
    x[0] = 0  # all zero: d = 0
    x[1, :32] = 0  # a zero IQ1_S sub-block
    x[1, 160:176] = 0  # a zero IQ1_M sub-block
    x[2] = 1.0  # constant: every value ties in the sort
    x[3] = -0.25  # constant negative: the best split has a negative scale (levels and shift flip)
    x[4] *= 1e-6  # tiny
    x[5] *= 1e4  # huge
    x[6] *= 0.01
    x[6, [3, 77, 200]] = torch.tensor([50.0, -80.0, 65.0])  # sparse outliers
    x[7] = torch.randint(-2, 3, (NARROW,), generator=gen).float()  # small integers: ties in the sort
    x[8, :64] = 1e-20  # below both epsilons
    x[8, 64:80] = 1e-9  # below IQ1_M's 1e-7, above IQ1_S's 1e-12
    x[9] = torch.tensor([2.0, -2.0] * (NARROW // 2))
    x[10] = x[10].abs()  # all positive
    x[11] = -x[11].abs()  # all negative
    x[12] = torch.sign(torch.randn(NARROW, generator=gen)) * (torch.rand(NARROW, generator=gen) > 0.3)  # ternary
    x[13, :32] = 1e-30 * torch.randn(32, generator=gen)  # subnormal squares
    x[14] = torch.linspace(-1, 1, NARROW)
    x[15] = torch.randn(NARROW // 8, 1, generator=gen).expand(NARROW // 8, 8).reshape(NARROW)  # constant groups
    x[16, 5] = 1e4  # one outlier in a normal row
    x[17] = torch.round(x[17] * 2) / 2  # ties on a half grid
    x[18, 128:] = -3.0 * x[18, :128]
    x[19] = x[19] + 3.0  # offset: the shift sign matters
    return x


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    heavy_tailed = student_t2(gen, (12, WIDE))
    return {"normal": torch.randn(12, WIDE, generator=gen), "heavy_tailed": heavy_tailed,
            "tricky": _tricky(gen)}


def _importance(kind: str, n: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(1)
    imp = torch.rand(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen)) + 1e-3
    if kind == "with_zeros":
        imp[::7] = 0
        imp[32:64] = 0  # a whole sub-block without weight: no split scores, the sub-block is skipped
    elif kind == "one_huge":
        imp[10] = 1e6
    return imp


def _importances(name: str) -> list[str]:
    kinds = ["positive", "with_zeros", "one_huge"]
    return kinds if get_codec(name).requires_importance else ["none", *kinds]


@needs_kernels
@needs_ggml
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("data", ["normal", "heavy_tailed", "tricky"])
def test_encode_matches_ggml_bytes(name, data, inputs):
    x = inputs[data]
    codec = get_codec(name)
    failures = []
    for kind in _importances(name):
        imp = _importance(kind, x.shape[1])
        ours = codec.encode(x, imp).numpy().reshape(-1, codec.block_bytes)
        ref = ggml_reference.quantize(codec.type_id, x.numpy(), None if imp is None else imp.numpy())
        bad = np.flatnonzero(~(ours == ref.reshape(-1, codec.block_bytes)).all(axis=1))
        if len(bad):
            failures.append(f"{kind}: {len(bad)} of {len(ours)} blocks differ (first: {bad[:5].tolist()})")
    assert not failures, "; ".join(failures)


@needs_kernels
@pytest.mark.parametrize("name", TYPES)
def test_decode_matches_gguf_py(name, inputs):
    codec = get_codec(name)
    for data in ("normal", "tricky"):
        x = inputs[data]
        encoded = codec.encode(x, _importance("positive", x.shape[1]))
        decoded = codec.decode(encoded, x.shape[1]).numpy()
        expected = quants.dequantize(encoded.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
        assert np.array_equal(decoded, expected.astype(np.float32)), data
        if data == "normal":  # a sane 1-bit quantizer (unit-variance data)
            assert np.mean((decoded - x.numpy()) ** 2) < 0.5


@pytest.mark.parametrize("name", TYPES)
def test_decode_arbitrary_bytes(name):
    codec = get_codec(name)
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(0, 256, (256, codec.block_bytes), generator=gen, dtype=torch.uint8)
    if name == "IQ1_S":
        data[:, 1] &= 0x3F  # a finite fp16 d
    else:
        data[:, 55] &= 0x3F  # d's top byte is the top nibble of the last scale word
    decoded = codec.decode(data, codec.block_size).numpy()
    expected = quants.dequantize(data.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))


def test_iq1_s_requires_importance():
    with pytest.raises(QuantkitError, match="IQ1_S needs an importance matrix: pass --imatrix"):
        get_codec("IQ1_S").encode(torch.randn(2, 256))


@needs_kernels
def test_zero_rows_are_what_ggml_writes():
    """Read off quantize_row_iq1_*_impl: nothing above the epsilon leaves the block zero bytes."""
    for name in TYPES:
        assert not get_codec(name).encode(torch.zeros(1, 256), torch.ones(256)).any()


@needs_kernels
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_tensors_encode_on_cpu(name, inputs):
    codec = get_codec(name)
    x, imp = inputs["tricky"], _importance("positive", NARROW)
    cpu = codec.encode(x, imp)
    gpu = codec.encode(x.cuda(), imp.cuda())
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(codec.decode(gpu, NARROW).cpu(), codec.decode(cpu, NARROW))
