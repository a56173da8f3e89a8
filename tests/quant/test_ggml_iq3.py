"""IQ3_XXS / IQ3_S: encoded bytes against ggml's own quantizer (libggml-base via ggml_quantize_chunk), decoding
against gguf-py's numpy dequantizers, and the kernel-only encoder (no torch codec) chosen whatever the
implementation setting."""

import numpy as np
import pytest
import torch
from codec_checks import needs_ggml, needs_kernels, student_t2
from gguf import GGMLQuantizationType, quants

from quantkit.errors import QuantkitError
from quantkit.quant import get_codec
from quantkit.testing import ggml_reference

TYPES = ["IQ3_XXS", "IQ3_S"]
N = 512




def _tricky(gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(20, N, generator=gen)
    x[0] = 0  # all-zero row: d = 0, every byte 0
    x[1, 32:64] = 0  # a zero sub-block: IQ3_S then writes the next sub-blocks' points and signs one slot early
    x[1, 256 + 224:] = 0  # ... and a zero last sub-block
    x[2] = 1.0  # constant
    x[3] = -x[3].abs()  # all negative: IQ3_XXS's sign parity on every group of 8
    x[4] = x[4].abs()
    x[5] *= 1e-6  # small: fp16-subnormal d
    x[6] *= 1e4  # large
    x[7] = torch.randint(-4, 5, (N,), generator=gen).float()  # small integers: ties everywhere
    x[8] = 1e-3 * x[8]
    x[8, ::61] = 50.0  # sparse outliers
    x[9, :64] *= 1e-9  # sub-blocks below IQ3_XXS's 1e-8 (skipped there, searched by IQ3_S)
    x[10, :256] *= 1e-30  # x^2 underflows: zero weights without importance
    x[11] = torch.tensor([-1.0] + [1.0] * 7).repeat(N // 8)  # one negative per 8, equal w x^2: the first is flipped
    x[12, 100] = 1e3  # one outlier
    x[13] = torch.linspace(-1, 1, N)
    x[14] = 0.1 * (2 * torch.randint(0, 8, (N,), generator=gen) + 1).float()  # on lattice levels
    x[15, :256] = 0  # a zero super-block next to a normal one
    x[16, :32] = torch.tensor([-2.0, 2.0] * 16)  # |x| ties of both signs
    x[17, ::3] = 0
    x[18] = x[18].bfloat16().float()  # checkpoint-like 8-bit mantissas
    return x


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"normal": torch.randn(16, N, generator=gen), "heavy_tailed": student_t2(gen, (16, N)),
            "tricky": _tricky(gen), "one_block": torch.randn(8, 256, generator=gen),
            "wide": student_t2(gen, (8, 2048))}


def _importance(kind: str, n: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(1)
    imp = torch.rand(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen)) + 1e-3
    if kind == "with_zeros":
        imp[::7] = 0
        imp[64:96] = 0  # a whole sub-block without weight: no trial scale is ever accepted
    return imp


def _mismatch_report(name: str, ours: np.ndarray, ref: np.ndarray, n: int) -> str:
    codec = get_codec(name)
    ob, rb = ours.reshape(-1, codec.block_bytes), ref.reshape(-1, codec.block_bytes)
    a = codec.decode(torch.from_numpy(ours.copy()), n).numpy()
    b = codec.decode(torch.from_numpy(ref.copy()), n).numpy()
    return f"{(ob == rb).all(axis=1).mean():.4%} of blocks identical; max decoded difference {np.abs(a - b).max():g}"


@needs_kernels
@needs_ggml
@pytest.mark.interop
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("data", ["normal", "heavy_tailed", "tricky", "one_block", "wide"])
@pytest.mark.parametrize("imp", ["none", "positive", "with_zeros"])
def test_encode_matches_ggml_bytes(name, data, imp):
    x = _inputs()[data]
    importance = _importance(imp, x.shape[1])
    codec = get_codec(name)
    ours = codec.encode(x, importance).numpy()
    ref = ggml_reference.quantize(codec.type_id, x.numpy(), None if importance is None else importance.numpy())
    assert np.array_equal(ours, ref), _mismatch_report(name, ours, ref, x.shape[1])


@needs_kernels
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("data", ["normal", "tricky"])
def test_decode_matches_gguf_py(name, data):
    x = _inputs()[data]
    codec = get_codec(name)
    for imp in ("none", "with_zeros"):
        encoded = codec.encode(x, _importance(imp, N))
        decoded = codec.decode(encoded, N).numpy()
        expected = quants.dequantize(encoded.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
        assert np.array_equal(decoded, expected.astype(np.float32))
        if data == "normal" and imp == "none":  # a sane 3-bit quantizer
            assert np.mean((decoded - x.numpy()) ** 2) < 0.06


@pytest.mark.parametrize("name", TYPES)
def test_decode_arbitrary_bytes(name):
    codec = get_codec(name)
    data = torch.randint(0, 256, (64, codec.block_bytes), generator=torch.Generator().manual_seed(2),
                         dtype=torch.uint8)
    data[:, 1] &= 0x3F  # a finite fp16 d
    decoded = codec.decode(data, codec.block_size).numpy()
    expected = quants.dequantize(data.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))


@needs_kernels
@pytest.mark.parametrize("name", TYPES)
def test_zero_blocks_are_all_zero_bytes(name):
    """Read off ggml: an all-zero super-block keeps d = 0 and no point, sign or scale bit is set (IQ3_XXS
    clears the block; IQ3_S skips every sub-block)."""
    assert not get_codec(name).encode(torch.zeros(2, 512)).any()


@needs_kernels
def test_values_ggml_aborts_on_are_an_error():
    """x^2 overflows: every neighbour distance is inf and ggml's search asserts (aborting the process)."""
    x = torch.full((1, 256), 3e19)
    x[0, 1::4] = 1.0  # combinations off the lattice, so the neighbour search runs
    with pytest.raises(QuantkitError, match="values so large"):
        get_codec("IQ3_XXS").encode(x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_tensors_encode_on_cpu_and_decode_on_cuda(name):
    codec = get_codec(name)
    x, importance = _inputs()["tricky"], _importance("with_zeros", N)
    cpu = codec.encode(x, importance)
    gpu = codec.encode(x.cuda(), importance.cuda())
    assert gpu.is_cuda and torch.equal(cpu, gpu.cpu())
    assert torch.equal(codec.decode(gpu, N).cpu(), codec.decode(cpu, N))
