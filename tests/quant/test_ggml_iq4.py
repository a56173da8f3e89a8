"""IQ4_NL / IQ4_XS: encoded bytes against ggml's own quantizer (libggml-base via ggml_quantize_chunk), decoding
against gguf-py's numpy dequantizers."""

import numpy as np
import pytest
import torch
from codec_checks import student_t2
from gguf import GGMLQuantizationType, quants

from quantkit.quant import get_codec, ggml_iq4
from quantkit.quant.ggml_iq4 import KVALUES
from quantkit.testing import ggml_reference

pytestmark = pytest.mark.usefixtures("codec_impl")  # every test on the torch codecs and the kernels

TYPES = ["IQ4_NL", "IQ4_XS"]
N = 512



def _tricky(gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(20, N, generator=gen)
    x[0] = 0  # all-zero row: zero sub-blocks and zero super-blocks (IQ4_XS stores d = -0.0)
    x[1, :32] = 0  # one zero sub-block inside a super-block
    x[1, 256 + 96:256 + 128] = 0
    x[2] = 1.0  # constant: every element ties for the largest magnitude
    x[3] = -x[3].abs()  # all negative
    x[4] = x[4].abs()  # all positive
    x[5] *= 1e-6  # tiny (fp16-subnormal scales)
    x[6] *= 1e4  # large
    mids = [(a + b) / 2 for a, b in zip(KVALUES, KVALUES[1:], strict=False)]
    x[7, :32] = torch.tensor([127.0] + mids + [0.0] * 16)  # max 127 -> id = 1: exact midpoints in the search
    x[7, 32:64] = -x[7, :32]
    x[8] = torch.randint(-8, 8, (N,), generator=gen).float()  # small integers: many exact ties
    x[9, :64] = 1e-20  # below GROUP_MAX_EPS: scale 0
    x[9, 64:96] *= 1e-14
    x[10, :32] = torch.tensor([-2.0, 2.0] * 16)  # |max| tie between signs: the first one wins
    x[11, 5] = 1e4  # one outlier: the other sub-scales round to 0 in IQ4_XS
    x[12, 32:64] = -x[12, :32]  # opposite sub-scales: the 6-bit scale clamps at 31
    x[13, 256:] = 3.0 * x[13, :256]
    x[14, ::32] = 0.5  # ties in |x| across sub-blocks of a super-block
    x[15, :256] *= 1e-30  # subnormal squares in the weights and sums
    x[16, :32] = 2e6  # d beyond the fp16 range: stored as inf, exactly as ggml does
    return x


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"normal": torch.randn(32, N, generator=gen), "heavy_tailed": student_t2(gen, (32, N)),
            "tricky": _tricky(gen), "many_blocks": torch.randn(128, N, generator=gen)}


def _importance(kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(1)
    imp = torch.rand(N, generator=gen) * torch.exp(2 * torch.randn(N, generator=gen)) + 1e-3
    if kind == "with_zeros":
        imp[::7] = 0
        imp[64:96] = 0  # a sub-block with all weights zero: its scale search finds nothing (scale 0)
    return imp


def _mismatch_report(name: str, ours: np.ndarray, ref: np.ndarray, n: int) -> str:
    codec = get_codec(name)
    ob, rb = ours.reshape(-1, codec.block_bytes), ref.reshape(-1, codec.block_bytes)
    same = (ob == rb).all(axis=1).mean()
    a = codec.decode(torch.from_numpy(ours.copy()), n).numpy()
    b = codec.decode(torch.from_numpy(ref.copy()), n).numpy()
    return f"{same:.4%} of blocks identical; max decoded difference {np.abs(a - b).max():g}"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("data", ["normal", "heavy_tailed", "tricky"])
@pytest.mark.parametrize("imp", ["none", "positive", "with_zeros"])
def test_decode_matches_gguf_py(name, data, imp):
    x = _inputs()[data]
    codec = get_codec(name)
    encoded = codec.encode(x, _importance(imp))
    decoded = codec.decode(encoded, N).numpy()
    expected = quants.dequantize(encoded.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))
    # a sane 4-bit quantizer (zero importance on a whole sub-block zeroes it, as in ggml: not checked there)
    if data == "normal" and imp != "with_zeros":
        assert np.mean((decoded - x.numpy()) ** 2) < 0.01


def test_importance_weights_use_correctly_rounded_sqrt():
    """weight = qw * sqrtf(sigma2 + x*x) with IEEE sqrtf (torch's own float32 sqrt is off by an ulp at times,
    which flips about one IQ4_NL block in 4000)."""
    x = _inputs()["heavy_tailed"]
    imp = _importance("positive")
    xs = ggml_iq4._split(x)
    got = ggml_iq4._weights(x, xs, imp, 32).numpy()  # [32, rows, blocks]
    xb = x.numpy().reshape(x.shape[0], -1, 32)
    sigma2 = np.zeros(xb.shape[:2], np.float32)
    for j in range(32):  # sequential float32 sum, as in C
        sigma2 += xb[..., j] * xb[..., j]
    sigma2 *= np.float32(2 / 32)
    want = imp.numpy().reshape(-1, 32) * np.sqrt(sigma2[..., None] + xb * xb)
    assert np.array_equal(got, want.transpose(2, 0, 1))


@pytest.mark.parametrize("name", TYPES)
def test_decode_arbitrary_bytes(name):
    codec = get_codec(name)
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(0, 256, (64, codec.block_bytes), generator=gen, dtype=torch.uint8)
    data[:, 1] &= 0x3F  # keep the fp16 scale finite (exponent < 31)
    decoded = codec.decode(data, codec.block_size).numpy()
    expected = quants.dequantize(data.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))


def test_zero_blocks_are_what_ggml_writes():
    """Read off quantize_row_iq4_nl_impl: scale 0 and every index best_index_int8(0) = 8 (value 1); IQ4_XS
    stores d = fp16(-0.0/32) and 6-bit sub-scales 0 + 32."""
    nl = get_codec("IQ4_NL").encode(torch.zeros(1, 32)).numpy()[0]
    assert list(nl) == [0, 0] + [0x88] * 16
    xs = get_codec("IQ4_XS").encode(torch.zeros(1, 256)).numpy()[0]
    assert list(xs[:8]) == [0x00, 0x80, 0xAA, 0xAA, 0, 0, 0, 0] and (xs[8:] == 0x88).all()


@pytest.mark.interop
@pytest.mark.skipif(not ggml_reference.available(),
                    reason="llama-cpp-python's libggml-base is not installed (needed as the byte-exact reference)")
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("data", ["normal", "heavy_tailed", "tricky", "many_blocks"])
@pytest.mark.parametrize("imp", ["none", "positive", "with_zeros"])
def test_encode_matches_ggml_bytes(name, data, imp):
    x = _inputs()[data]
    importance = _importance(imp)
    codec = get_codec(name)
    ours = codec.encode(x, importance).numpy()
    ref = ggml_reference.quantize(codec.type_id, x.numpy(), None if importance is None else importance.numpy())
    assert np.array_equal(ours, ref), _mismatch_report(name, ours, ref, N)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_matches_cpu(name):
    codec = get_codec(name)
    for data in ("normal", "heavy_tailed", "tricky"):
        for imp in ("none", "with_zeros"):
            x, importance = _inputs()[data], _importance(imp)
            cpu = codec.encode(x, importance)
            gpu = codec.encode(x.cuda(), None if importance is None else importance.cuda()).cpu()
            assert torch.equal(cpu, gpu), (data, imp)
            assert torch.equal(codec.decode(gpu.cuda(), N).cpu(), codec.decode(cpu, N))
