"""The compiled CPU codecs (quantkit/quant/_ggml_kernels.c) against the torch codecs, byte for byte, on random,
heavy-tailed and edge-case rows, with and without importance; how the implementation is chosen; and that
ChunkEncoder runs kernel-encoded chunks on threads (the kernels release the GIL)."""

import threading

import pytest
import torch
from codec_checks import needs_kernels

from quantkit.errors import QuantkitError
from quantkit.quant import CODECS, get_codec, kernels

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
N = 768  # three super-blocks; the 32-element types take rows of 288 (9 blocks: the kernels search 8 side by side)



def _rows(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(24, n, generator=gen)
    u = torch.rand(24, n, generator=gen).clamp_min(1e-30)
    edge = torch.randn(16, n, generator=gen)
    edge[0] = 0  # zeros
    edge[1] = 0.37  # constant
    edge[2] = 1e-20  # tiny: below every epsilon
    edge[3] *= 1e-6  # small: fp16-subnormal scales
    edge[4] *= 3e4  # huge: scales at and beyond the top of the fp16 range
    edge[5] = -edge[5].abs()  # negative only
    edge[6] = edge[6].abs()  # positive only
    edge[7] = -0.0
    edge[8, ::3] = 0
    edge[9] = torch.round(edge[9] * 4) / 4  # exact ties
    edge[10, :32] = 1e-30 * torch.randn(32, generator=gen)  # subnormal squares
    edge[11] = torch.randn(n // 16, 1, generator=gen).expand(n // 16, 16).reshape(n)  # constant sub-blocks
    edge[12, 7] = 1e3  # one outlier
    edge[13] = torch.linspace(-1, 1, n)
    edge[14] = (torch.arange(n) % 16 - 8).float()  # exactly on a grid
    edge[15, :64] = -edge[15, :64].abs()
    return {"random": torch.randn(32, n, generator=gen), "heavy_tailed": z / torch.sqrt(-torch.log(u)),
            "edge": edge}


def _importances(n: int) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(6)
    zeros = torch.rand(n, generator=gen) ** 3 * 50
    zeros[::5] = 0
    zeros[32:64] = 0
    return {"none": None, "positive": torch.rand(n, generator=gen) * 4 + 0.01, "with_zeros": zeros}


def _encode(name: str, x: torch.Tensor, importance, impl: str, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv(kernels.ENV, impl)
    return get_codec(name).encode(x, importance)


@needs_kernels
@pytest.mark.parametrize("name", TYPES)
def test_kernel_equals_torch_codec(name, monkeypatch):
    torch.set_num_threads(1)  # the torch codecs are many small ops: intra-op threads only wait on a busy machine
    codec = get_codec(name)
    n = N if codec.block_size == 256 else 288  # 9 legacy blocks per row: a partial group of side-by-side blocks
    rows, importances = _rows(n), _importances(n)
    failures = []
    for data, x in rows.items():
        for imp_name, imp in importances.items():
            ours = _encode(name, x, imp, "kernel", monkeypatch)
            ref = _encode(name, x, imp, "torch", monkeypatch)
            assert ours.shape == ref.shape and ours.dtype == torch.uint8
            same = (ours == ref).reshape(x.shape[0], -1, codec.block_bytes).all(dim=2)
            if not same.all():
                bad = (~same).nonzero()[:4].tolist()
                failures.append(f"{data}/{imp_name}: {(~same).sum()} blocks differ, e.g. [row, block] {bad}")
    assert not failures, "; ".join(failures)


@needs_kernels
def test_kernel_takes_any_layout_and_dtype(monkeypatch):
    x = torch.randn(64, 512, dtype=torch.float64)
    t = x.t().contiguous().t()  # not contiguous
    imp = torch.rand(512) + 0.1
    for name in ("Q4_K", "IQ4_XS"):
        ours = _encode(name, t, imp.double(), "kernel", monkeypatch)
        assert torch.equal(ours, _encode(name, x.float(), imp, "torch", monkeypatch))


def test_implementation_choice(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "torch")
    assert not kernels.handles(get_codec("Q4_K").type_id)
    assert get_codec("Q4_K").searches(None)  # the torch codec's scale search: processes in ChunkEncoder
    monkeypatch.setenv(kernels.ENV, "bogus")
    with pytest.raises(QuantkitError, match=kernels.ENV):
        kernels.handles(get_codec("Q4_K").type_id)
    monkeypatch.setenv(kernels.ENV, "auto")
    assert not kernels.handles(get_codec("Q4_K").type_id, "cuda")  # CUDA tensors take the torch codecs
    assert kernels.handles(get_codec("Q4_K").type_id) == kernels.available()
    assert not kernels.handles(get_codec("F16").type_id)  # the float types stay in torch
    if not kernels.available():
        monkeypatch.setenv(kernels.ENV, "kernel")
        with pytest.raises(QuantkitError, match="not built"):
            kernels.handles(get_codec("Q4_K").type_id)


@needs_kernels
def test_kernel_codecs_run_on_threads(monkeypatch, tmp_path):
    """With the kernels the scale-search codecs no longer need forked workers: ChunkEncoder keeps them on its
    threads, and the bytes are the torch codecs' in order."""
    from quantkit.formats.gguf import writer as gguf_writer

    monkeypatch.setenv(kernels.ENV, "auto")
    assert not get_codec("Q4_K").searches(None)
    codec = get_codec("Q6_K")
    chunks = [torch.randn(16, 512, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    imp = torch.rand(512) + 0.1

    class Sink:
        def __init__(self):
            self.parts = []

        def write(self, name, data):
            self.parts.append(bytes(data))

    sink, encoder = Sink(), gguf_writer.ChunkEncoder(2)
    seen = set()
    original = codec.encode.__func__

    def spy(cls, x, importance=None):
        seen.add(threading.current_thread().name)
        return original(cls, x, importance)

    monkeypatch.setattr(codec, "encode", classmethod(spy))
    try:
        for c in chunks:
            encoder.submit(codec, c, imp, sink, "t", single=False)
        encoder.flush()
        assert encoder._process_pool is None
    finally:
        encoder.close()
    assert seen and threading.main_thread().name not in seen
    monkeypatch.setenv(kernels.ENV, "torch")
    assert sink.parts == [bytes(original(codec, c, imp).numpy()) for c in chunks]


# the codecs with no torch encoder (the i-quants' lattice searches)
KERNEL_ONLY = [name for name, codec in CODECS.items() if codec.kernel_only]


@needs_kernels
@pytest.mark.parametrize("name", KERNEL_ONLY)
def test_kernel_only_codecs_ignore_the_torch_choice(name, monkeypatch):
    """QUANTKIT_CODEC_IMPL=torch still encodes through the kernels, and ChunkEncoder keeps them on threads
    (searches() is False)."""
    codec = get_codec(name)
    x, imp = torch.randn(4, 512, generator=torch.Generator().manual_seed(2)), torch.rand(512) + 0.1
    monkeypatch.setenv(kernels.ENV, "kernel")
    want = codec.encode(x, imp)
    monkeypatch.setenv(kernels.ENV, "torch")
    assert torch.equal(codec.encode(x, imp), want)
    assert not codec.searches(None) and not codec.searches(imp)


@pytest.mark.parametrize("name", KERNEL_ONLY)
def test_kernel_only_codecs_without_the_library_are_one_clear_error(name, monkeypatch):
    monkeypatch.setattr(kernels, "library", lambda: None)
    with pytest.raises(QuantkitError, match=rf"{name} is encoded only by .*build_ext --inplace"):
        get_codec(name).encode(torch.zeros(1, 256), torch.ones(256))
