"""GPTQ inside ggml's blocks (quantkit.quant.ggml_gptq) and the codecs' level access it stands on."""

import pytest
import torch
from codec_checks import needs_kernels

from quantkit.errors import QuantkitError
from quantkit.quant import get_codec
from quantkit.quant.codec import CODECS
from quantkit.quant.ggml_gptq import gptq_encode, supports

LEVEL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def test_which_codecs_expose_levels():
    assert sorted(n for n, c in CODECS.items() if supports(c)) == sorted(LEVEL_TYPES)


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, n, generator=g) * torch.rand(48, 1, generator=g) * 3
    x[5] = 0  # an all-zero row: zero scales, levels kept
    x[6, : n // 2] = 0
    return x


@pytest.mark.parametrize("name", LEVEL_TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_levels_decode_as_the_codec_does_and_repack_to_the_same_bytes(name, weighted):
    codec = get_codec(name)
    n = 512
    x = _rows(n)
    importance = torch.rand(n, generator=torch.Generator().manual_seed(1)) if weighted else None
    blocks = codec.encode(x, importance).reshape(-1, codec.block_bytes)
    scale, offset, levels = codec.levels(blocks)
    values = torch.tensor(codec.level_values, dtype=torch.float32)
    assert levels.min() >= 0 and levels.max() < len(values)
    assert torch.equal(scale * values[levels] + offset, codec.decode_blocks(blocks))
    assert torch.equal(codec.with_levels(blocks, levels), blocks)
    # other levels under the same headers decode to exactly those levels
    other = torch.randint(0, len(values), levels.shape, generator=torch.Generator().manual_seed(2))
    changed = codec.with_levels(blocks, other)
    assert torch.equal(codec.levels(changed)[2], other)
    assert torch.equal(codec.decode_blocks(changed), scale * values[other] + offset)


def _correlated_inputs(n: int, tokens: int = 4096, seed: int = 3):
    """Inputs with correlated channels of unequal size, as a layer's are; H = 2 XᵀX / tokens."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    x = (torch.randn(tokens, n, generator=g) @ mix) * torch.exp(torch.randn(n, generator=g))
    return x, 2 * x.T @ x / tokens


def _output_error(codec, w: torch.Tensor, data: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - codec.decode(data, w.shape[1])) @ x.T).pow(2).mean())


@pytest.mark.parametrize("name", LEVEL_TYPES)
def test_gptq_lowers_the_output_error_of_every_level_type(name):
    """Against ggml's own encoding with the same importance (H's diagonal): the layer's output error drops."""
    codec = get_codec(name)
    n = 512
    x, H = _correlated_inputs(n)
    w = torch.randn(64, n, generator=torch.Generator().manual_seed(4))
    plain = _output_error(codec, w, codec.encode(w, torch.diagonal(H).clone()), x)
    gptq = _output_error(codec, w, gptq_encode(codec, w, H), x)
    assert gptq < 0.8 * plain, (gptq, plain)


def test_without_refits_the_headers_are_ggml_s_search_on_the_weights():
    """Headers fixed before any feedback (act-order with static groups): ggml's search on W; only levels move."""
    codec = get_codec("Q4_K")
    x, H = _correlated_inputs(512)
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(5))
    importance = torch.rand(512, generator=torch.Generator().manual_seed(6))
    ours = gptq_encode(codec, w, H, importance, header_refits=0).reshape(-1, codec.block_bytes)
    ggml = codec.encode(w, importance).reshape(-1, codec.block_bytes)
    assert torch.equal(ours[:, :16], ggml[:, :16])  # d, dmin, the 6-bit scales and mins of every block
    assert not torch.equal(ours[:, 16:], ggml[:, 16:])


@pytest.mark.parametrize("name", ["Q3_K", "Q4_K", "Q6_K", "IQ4_XS", "Q4_0"])
def test_header_refits_never_raise_a_row_s_output_error(name):
    """Each refit searches the headers over the values the pass before rounded and a row keeps it only where GPTQ's
    loss drops: every row's error under the (damped) Hessian is at most that of ggml's headers, and lower
    overall."""
    codec = get_codec(name)
    x, H = _correlated_inputs(512)
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(9))
    damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(512)

    def row_errors(data):
        e = w - codec.decode(data, 512)
        return torch.einsum("ij,jk,ik->i", e, damped, e)

    static, refit = (row_errors(gptq_encode(codec, w, H, header_refits=n)) for n in (0, 2))
    assert (refit <= static * (1 + 1e-4)).all()
    assert refit.sum() < static.sum()


@needs_kernels
def test_grid_types_feed_whole_blocks_forward():
    """IQ3_S has no per-element levels: each block is ggml's encoding of the fed-back weights, so the first block
    is byte-identical to ggml's and the output error still drops."""
    codec = get_codec("IQ3_S")
    assert not supports(codec)
    x, H = _correlated_inputs(1024)
    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(7))
    ours = gptq_encode(codec, w, H)
    plain = codec.encode(w, torch.diagonal(H).clone())
    assert torch.equal(ours[:, :codec.block_bytes], plain[:, :codec.block_bytes])
    assert _output_error(codec, w, ours, x) < 0.95 * _output_error(codec, w, plain, x)


def test_inputs_that_never_fire_are_zero_weight_not_nan():
    codec = get_codec("Q4_K")
    x, _ = _correlated_inputs(256)
    x[:, 10:20] = 0
    H = 2 * x.T @ x / len(x)
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(8))
    out = codec.decode(gptq_encode(codec, w, H), 256)
    assert torch.isfinite(out).all()


def test_bad_input_is_refused():
    codec = get_codec("Q4_K")
    H = torch.eye(256)
    w = torch.randn(4, 256)
    w[1, 3] = float("nan")
    with pytest.raises(QuantkitError, match="NaN or infinite"):
        gptq_encode(codec, w, H)
    with pytest.raises(QuantkitError, match="multiple of 256"):
        gptq_encode(codec, torch.randn(4, 100), torch.eye(100))
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_encode(codec, torch.randn(4, 256), torch.eye(512))
