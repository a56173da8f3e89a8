"""IQ2_XXS / IQ2_XS / IQ2_S: encoded bytes against ggml's own quantizer (libggml-base via ggml_quantize_chunk),
decoding against gguf-py's numpy dequantizers, and the kernel-only encoding path (no torch encoder)."""

import numpy as np
import pytest
import torch
from codec_checks import needs_ggml, needs_kernels, student_t2
from gguf import GGMLQuantizationType, quants

from quantkit.errors import QuantkitError
from quantkit.quant import get_codec
from quantkit.quant.ggml_iq2 import grid_levels
from quantkit.testing import ggml_reference

TYPES = ["IQ2_XXS", "IQ2_XS", "IQ2_S"]
WIDE = 1024  # four super-blocks per row
NARROW = 256




def _tricky(gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(20, NARROW, generator=gen)
    x[0] = 0  # all zero: every sub-block below the epsilon, d = 0
    x[1, :32] = 0  # a zero 32-element (IQ2_XXS) sub-block
    x[1, 96:112] = 0  # a zero 16-element (IQ2_XS/S) sub-block
    x[2] = 1.0  # constant: every value on one level, ties everywhere
    x[3] = -0.5  # constant negative: 8 negatives per group (even), all signs set
    x[4] *= 1e-6  # tiny: fp16-subnormal d
    x[5] *= 1e4  # huge
    x[6] *= 0.01
    x[6, [3, 77, 200]] = torch.tensor([50.0, -80.0, 65.0])  # sparse outliers: other sub-scales round to 0
    x[7] = torch.randint(-3, 4, (NARROW,), generator=gen).float()  # small integers: ties in rounding
    x[8, :64] = 1e-20  # below every epsilon
    x[8, 64:80] = 1e-10  # below IQ2_S's 1e-8, above IQ2_XXS/XS's 1e-15
    x[9] = torch.tensor([2.0, -2.0] * (NARROW // 2))  # |x| ties across signs
    x[10, :8] = torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1])  # one negative: parity fix picks among equal w*x*x
    x[10, 8:16] = torch.tensor([-1.0, -1, -1, 1, 1, 1, 1, 1])  # three negatives
    x[11] = x[11].abs()
    x[12] = -x[12].abs()
    levels = torch.tensor([1.0, 3.0, 5.0])[torch.randint(0, 3, (NARROW,), generator=gen)]
    x[13] = 0.1 * levels * torch.sign(torch.randn(NARROW, generator=gen))  # exactly on the levels
    x[14, :32] = 1e-30 * torch.randn(32, generator=gen)  # subnormal squares in the weights
    x[15] = torch.linspace(-1, 1, NARROW)
    x[16] = torch.randn(NARROW // 8, 1, generator=gen).expand(NARROW // 8, 8).reshape(NARROW)  # constant groups
    x[17, 5] = 1e4  # one outlier in a normal row
    x[18] = torch.round(x[18] * 2) / 2  # ties on a half grid
    x[19, 128:] = 3.0 * x[19, :128]
    return x


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"normal": torch.randn(12, WIDE, generator=gen), "heavy_tailed": student_t2(gen, (12, WIDE)),
            "tricky": _tricky(gen)}


def _importance(kind: str, n: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(1)
    imp = torch.rand(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen)) + 1e-3
    if kind == "with_zeros":
        imp[::7] = 0
        imp[32:64] = 0  # a whole sub-block without weight: no trial scale is accepted
    elif kind == "one_huge":
        imp[10] = 1e6
    return imp


def _importances(name: str) -> list[str]:
    kinds = ["positive", "with_zeros", "one_huge"]
    return kinds if get_codec(name).requires_importance else ["none", *kinds]


def _compare(name: str, x: torch.Tensor, imp: torch.Tensor | None) -> tuple[np.ndarray, str]:
    codec = get_codec(name)
    ours = codec.encode(x, imp).numpy()
    ref = ggml_reference.quantize(codec.type_id, x.numpy(), None if imp is None else imp.numpy())
    ob, rb = ours.reshape(-1, codec.block_bytes), ref.reshape(-1, codec.block_bytes)
    bad = np.flatnonzero(~(ob == rb).all(axis=1))
    return ours, f"{len(bad)} of {len(ob)} blocks differ (first: {bad[:5].tolist()})" if len(bad) else ""


@needs_kernels
@needs_ggml
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("data", ["normal", "heavy_tailed", "tricky"])
def test_encode_matches_ggml_bytes(name, data, inputs):
    x = inputs[data]
    failures = []
    for kind in _importances(name):
        _, mismatch = _compare(name, x, _importance(kind, x.shape[1]))
        if mismatch:
            failures.append(f"{kind}: {mismatch}")
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
        if data == "normal":  # a sane 2-bit quantizer (unit-variance data; skewed importance costs some)
            assert np.mean((decoded - x.numpy()) ** 2) < 0.3


@pytest.mark.parametrize("name", TYPES)
def test_decode_arbitrary_bytes(name):
    """Every field read as ggml reads it: random blocks (finite fp16 d) against gguf-py."""
    codec = get_codec(name)
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(0, 256, (256, codec.block_bytes), generator=gen, dtype=torch.uint8)
    data[:, 1] &= 0x3F  # exponent < 31: a finite d
    decoded = codec.decode(data, codec.block_size).numpy()
    expected = quants.dequantize(data.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))


@pytest.mark.parametrize("name", TYPES)
def test_grid_levels_are_gguf_py_grid(name):
    """The level indices handed to the C code rebuild gguf-py's grid (ggml-common.h's table): distinct points,
    levels 0..2, and grid_map[levels] == the grid. That ggml's quantizer uses the same points in the same order
    (its kgrid_2bit_*) is what the byte-exact encode tests show."""
    table = getattr(quants, name)
    levels = grid_levels(name)
    assert levels.shape == table.grid_shape and levels.max() <= 2
    assert len({bytes(row) for row in levels}) == levels.shape[0]
    rebuilt = np.array(table.grid_map, dtype=np.float32)[levels]
    assert np.array_equal(rebuilt, np.asarray(table.grid).reshape(table.grid_shape))


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS"])
def test_importance_is_required(name):
    with pytest.raises(QuantkitError, match=f"{name} needs an importance matrix: pass --imatrix"):
        get_codec(name).encode(torch.randn(2, 256))


@needs_kernels
@pytest.mark.parametrize(("name", "scale"), [("IQ2_XXS", 1e15), ("IQ2_XS", 1e15), ("IQ2_S", 1e20)])
def test_overflowing_rows_are_an_error(name, scale):
    """Huge rows: every neighbour's weighted squared error overflows float32, and ggml aborts the process
    (GGML_ASSERT(grid_index >= 0) in iq2_find_best_neighbour, seen for these very rows); here it is a
    QuantkitError. (Larger still, IQ2_XXS encodes again: sigma2 overflows and the sub-blocks are skipped.)"""
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3)) * scale
    with pytest.raises(QuantkitError, match="ggml aborts"):
        get_codec(name).encode(x, torch.ones(256))


@needs_kernels
def test_zero_rows_are_what_ggml_writes():
    """Read off quantize_row_iq2_*_impl: with no sub-block above the epsilon the whole block is zero bytes."""
    for name in TYPES:
        codec = get_codec(name)
        assert not codec.encode(torch.zeros(1, 256), torch.ones(256)).any()


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
