"""Byte-for-byte against gguf-py's numpy quantizers (which replicate ggml's reference rounding)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from quantkit.errors import QuantkitError
from quantkit.quant import get_codec

pytestmark = pytest.mark.usefixtures("codec_impl")  # every test on the torch codecs and the kernels

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 256, generator=gen)
    tricky = normal.clone()
    tricky[0, :32] = 0  # all-zero block: scale 0 must not divide by zero
    tricky[1, :32] = 1.0  # ties for the largest magnitude
    tricky[2, :32] = -tricky[2, :32].abs()
    tricky[3, :32] = torch.linspace(-1, 1, 32)
    tricky[4] *= 1e-6  # tiny values: fp16 subnormal scales
    tricky[5] *= 1e4  # large values, scales near the top of the fp16 range
    tricky[6, :32] = 0.5 / 127 * torch.arange(32)  # exact .5 products: Q8_0 rounds half away from zero
    return {"normal": normal, "tricky": tricky, "heavy_tailed": torch.distributions.StudentT(2).sample((32, 512))}


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("data", ["normal", "tricky", "heavy_tailed"])
def test_encode_matches_gguf_py_bytes(name, data):
    x = _inputs()[data]
    codec = get_codec(name)
    ours = codec.encode(x).numpy()
    ref = quants.quantize(x.numpy(), GGMLQuantizationType[name]).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, ref)
    decoded = codec.decode(torch.from_numpy(ref.copy()), x.shape[1]).numpy()
    expected = quants.dequantize(ref, GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))


def test_bf16_nan_is_quiet_like_ggml():
    x = torch.tensor([[float("nan"), 1.0, -float("inf"), 3.0]])
    x_np = x.numpy().copy()
    x_np.view(np.uint32)[0, 0] = 0x7F800001  # signalling NaN
    ours = get_codec("BF16").encode(torch.from_numpy(x_np)).numpy()
    ref = quants.quantize(x_np, GGMLQuantizationType.BF16).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, ref)


def test_unknown_type_lists_valid_ones():
    with pytest.raises(QuantkitError, match="Q4_0"):
        get_codec("Q4_9")


def test_row_length_must_fit_blocks():
    with pytest.raises(QuantkitError, match="multiple of 32"):
        get_codec("Q4_0").encode(torch.zeros(2, 48))


def test_round_half_away_is_c_roundf():
    """Every float32 in [0.25, 4) and both neighbours of every k + 0.5 up to 2^22, against roundf computed in
    float64 (where |x| + 0.5 is exact)."""
    from quantkit.quant.codec import round_half_away

    start, stop = (np.array([v], dtype=np.float32).view(np.int32)[0] for v in (0.25, 4.0))
    dense = torch.arange(int(start), int(stop), dtype=torch.int32).view(torch.float32)
    halves = torch.arange(0, 1 << 22, dtype=torch.float64).add_(0.5).to(torch.float32)
    near = torch.cat([torch.nextafter(halves, torch.full_like(halves, v)) for v in (0.0, 1e30)] + [halves])
    for x in (dense, near, torch.tensor([0.0, 0.49999997, 0.5, 127.5, 126.49999])):
        for signed in (x, -x):
            expected = signed.double().abs().add(0.5).floor().copysign(signed.double()).float()
            assert torch.equal(round_half_away(signed), expected)
