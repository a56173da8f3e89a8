"""k-quants (Q2_K..Q6_K) and the importance-weighted legacy quantizers, byte-for-byte against ggml itself
(`ggml_quantize_chunk` from llama-cpp-python's libggml-base), and decoding against gguf-py's dequantizers."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from quantkit.quant import get_codec
from quantkit.testing import ggml_reference

pytestmark = pytest.mark.usefixtures("codec_impl")  # every test on the torch codecs and the kernels

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
WEIGHTED_LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]
N = 512


def _tricky() -> torch.Tensor:
    """Rows of 512 = two super-blocks each, built to hit the guards and tie-breaks of the C code."""
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(20, N, generator=gen)
    t[0, :16] = 0  # an all-zero sub-block
    t[0, 256:] = 0  # an all-zero super-block
    t[1] = 0.37  # constant blocks: max == min
    t[2] = -t[2].abs()  # all negative
    t[3] = t[3].abs()  # all positive: min clamps to 0
    t[4] *= 1e-6  # tiny: fp16 subnormal scales
    t[5] *= 1e4  # large
    t[6] = torch.round(t[6] * 2) / 2  # many exact ties in |x| and in the rounding
    t[7, :32], t[7, 32:64] = 1.0, -1.0  # equal magnitudes of both signs
    t[8] = torch.linspace(-1, 1, N)
    t[9, ::2] = 0  # half zeros
    t[10] = -0.0  # negative zeros: the sign of a zero scale / min must follow the C loops
    t[10, 5] = 1.0
    t[11, :256] = 1e-20  # constant and far below every epsilon
    t[12] = torch.arange(N) % 4 - 1.5  # exactly on a 4-level grid
    t[13] = torch.arange(N) % 16 * 0.25  # exactly on a 16-level grid with min 0
    t[14, :256] = 3.0 + 0.01 * t[14, :256]  # offset far from zero, narrow range
    t[15] = t[15] * (1 + 50 * (torch.rand(N, generator=gen) < 0.02))  # sparse large outliers
    t[16, :128] = -0.0
    t[17] = torch.randn(N // 16, 1, generator=gen).expand(N // 16, 16).reshape(N)  # constant sub-blocks
    return t


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        heavy = torch.distributions.StudentT(2.0).sample((32, N))
    return {"normal": torch.randn(32, N, generator=gen), "heavy_tailed": heavy, "tricky": _tricky()}


def _importances() -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(1)
    positive = torch.rand(N, generator=gen) + 0.05
    with_zeros = torch.rand(N, generator=gen) ** 3 * 100
    with_zeros[::7] = 0
    with_zeros[256:272] = 0  # a whole sub-block without weight
    return {"none": None, "importance": positive, "importance_with_zeros": with_zeros}


INPUTS = _inputs()
IMPORTANCES = _importances()



@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The codecs run thousands of small tensor ops; on a busy machine, intra-op threads that wait for a
    descheduled sibling make them ~100x slower, and they gain little on an idle one. Keep this file fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_ggml = pytest.mark.skipif(not ggml_reference.available(),
                                reason="llama-cpp-python (libggml-base) is not installed: no ggml to compare with")


@pytest.mark.interop
@needs_ggml
@pytest.mark.parametrize("imp", list(IMPORTANCES))
@pytest.mark.parametrize("name", K_TYPES + WEIGHTED_LEGACY)
def test_encode_matches_ggml_bytes(name, imp):
    codec = get_codec(name)
    importance = IMPORTANCES[imp]
    x = torch.cat(list(INPUTS.values()))  # one call per type: the cost is mostly per call, not per block
    ours = codec.encode(x, importance).numpy()
    ref = ggml_reference.quantize(codec.type_id, x.numpy(), None if importance is None else importance.numpy())
    same = (ours == ref).reshape(x.shape[0], -1, codec.block_bytes).all(axis=2)
    report, row = [], 0
    for data, rows in INPUTS.items():
        part = same[row:row + rows.shape[0]]
        if not part.all():
            bad_rows = np.flatnonzero(~part.all(axis=1))[:5]
            report.append(f"{data}: {(~part).sum()} of {part.size} blocks differ, rows {bad_rows}")
        row += rows.shape[0]
    assert not report, "; ".join(report)


@pytest.mark.parametrize("imp", list(IMPORTANCES))
@pytest.mark.parametrize("name", K_TYPES)
def test_decode_matches_gguf_py(name, imp):
    codec = get_codec(name)
    x = torch.cat([INPUTS["normal"][:8], INPUTS["heavy_tailed"][:8], INPUTS["tricky"]])
    data = codec.encode(x, IMPORTANCES[imp])
    assert data.shape == (x.shape[0], N // 256 * codec.block_bytes) and data.dtype == torch.uint8
    decoded = codec.decode(data, N).numpy()
    expected = quants.dequantize(data.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))
    if imp == "importance_with_zeros":
        return  # sub-blocks without weight legitimately quantize to zero
    # sanity: the quantizer is a quantizer (relative RMS error of the Gaussian rows)
    rel = np.sqrt(((decoded[:8] - x[:8].numpy()) ** 2).mean() / (x[:8].numpy() ** 2).mean())
    assert rel < {"Q2_K": 0.4, "Q3_K": 0.2, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025}[name]


def test_decode_random_bytes_matches_gguf_py():
    """Every bit pattern decodes as gguf-py does (scales above the encoder's range, all hmask bits, ...),
    as long as the fp16 fields are finite."""
    gen = torch.Generator().manual_seed(3)
    for name in K_TYPES:
        codec = get_codec(name)
        data = torch.randint(0, 256, (64, codec.block_bytes), dtype=torch.uint8, generator=gen)
        fp16_at = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[name]
        for off in fp16_at:
            data[:, off:off + 2] = torch.rand(64, 1, generator=gen).to(torch.float16).view(torch.uint8)
        decoded = codec.decode(data, 256).numpy()
        expected = quants.dequantize(data.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
        assert np.array_equal(decoded, expected.astype(np.float32)), name


@pytest.mark.parametrize("name", WEIGHTED_LEGACY)
def test_importance_changes_legacy_encoding_and_decodes(name):
    codec = get_codec(name)
    x = INPUTS["normal"][:4]
    plain, weighted = codec.encode(x), codec.encode(x, IMPORTANCES["importance"])
    assert not torch.equal(plain, weighted)
    decoded = codec.decode(weighted, N).numpy()
    expected = quants.dequantize(weighted.numpy(), GGMLQuantizationType[name]).reshape(decoded.shape)
    assert np.array_equal(decoded, expected.astype(np.float32))


@pytest.mark.parametrize("name", K_TYPES + WEIGHTED_LEGACY)
def test_chunking_does_not_change_bytes(name, monkeypatch):
    from quantkit.quant import ggml_legacy

    codec = get_codec(name)
    x = INPUTS["heavy_tailed"][:6]
    whole = [codec.encode(x), codec.encode(x, IMPORTANCES["importance"])]
    monkeypatch.setattr(codec, "chunk_cpu", 5, raising=False)
    monkeypatch.setattr(ggml_legacy, "_CHUNK_BLOCKS_CPU", 7)
    assert torch.equal(codec.encode(x), whole[0])
    assert torch.equal(codec.encode(x, IMPORTANCES["importance"]), whole[1])


def test_q8_0_ignores_importance():
    codec = get_codec("Q8_0")
    x = INPUTS["normal"][:4]
    assert torch.equal(codec.encode(x), codec.encode(x, IMPORTANCES["importance"]))


def test_importance_vector_shape_is_checked():
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="importance"):
        get_codec("Q4_K").encode(torch.zeros(2, 256), torch.ones(128))
