"""ChunkEncoder: worker threads and forked worker processes give the bytes of encoding in the calling thread,
to each writer in submission order, and a worker's error reaches the caller."""

import pytest
import torch

from quantkit import convert as api
from quantkit.errors import QuantkitError
from quantkit.formats.gguf import writer as gguf
from quantkit.quant import get_codec
from quantkit.testing.ggml_reference import tensor_data_digest


class _Writer:
    def __init__(self):
        self.written = []

    def write(self, name, data):
        self.written.append((name, data.copy()))


def _jobs(name, importance=None, chunks=4):
    x = torch.randn(chunks * 8, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    return [(get_codec(name), x[i * 8:(i + 1) * 8], importance) for i in range(chunks)]


def _encode(encoder, jobs, writers):
    try:
        for i, (codec, chunk, vector) in enumerate(jobs):
            encoder.submit(codec, chunk, vector, writers[i % len(writers)], f"t{i}", single=False)
        encoder.flush()
        return encoder._process_pool is not None
    finally:
        encoder.close()


@pytest.mark.parametrize(("name", "weighted", "workers"), [("Q4_K", False, "processes"), ("IQ4_NL", True, "processes"),
                                                            ("Q4_0", True, "processes"), ("Q8_0", False, "threads"),
                                                            ("Q4_0", False, "threads")])
def test_workers_give_the_inline_bytes_in_order(name, weighted, workers, codec_impl):
    importance = torch.rand(512, generator=torch.Generator().manual_seed(1)) if weighted else None
    jobs = _jobs(name, importance, chunks=9)  # more than the two in flight per worker
    writers = [_Writer(), _Writer()]
    used_processes = _encode(gguf.ChunkEncoder(2), jobs, writers)
    # the torch scale searches run in processes; the compiled kernels release the GIL and stay on threads
    assert used_processes == (workers == "processes" and gguf._CAN_FORK and codec_impl == "torch")
    for i, (codec, chunk, vector) in enumerate(jobs):
        name, data = writers[i % 2].written[i // 2]
        assert name == f"t{i}" and (data == codec.encode(chunk, vector).numpy()).all()


def test_a_worker_error_reaches_the_caller():
    jobs = _jobs("Q4_K", importance=torch.ones(100))  # wrong length
    with pytest.raises(QuantkitError, match="importance vector"):
        _encode(gguf.ChunkEncoder(2), jobs, [_Writer()])


def test_multi_chunk_conversion_equals_single_threaded(model_cache, tmp_path, monkeypatch):
    folder = model_cache("deepseek_v3", fp8=True)
    # every quantized tensor (each expert of a stacked one too) in 2-8 chunks; 4096 gave 3.6x the chunks, same paths
    monkeypatch.setattr(gguf, "_CHUNK_ELEMENTS", {"cpu": 16384})
    targets = ["gguf:Q4_K_M", "gguf:IQ4_XS"]
    parallel = api.convert(folder, targets, tmp_path / "parallel", threads=2)
    serial = api.convert(folder, targets, tmp_path / "serial", threads=1)
    for (a, _), (b, _) in zip(parallel, serial, strict=True):
        assert tensor_data_digest(a) == tensor_data_digest(b)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_requantize_converts_stored_chunks_on_the_workers(model_cache, tmp_path, dtype):
    """A GGUF's F16/BF16 tensors go to the workers as stored (no float32 copy of the tensor); the bytes are those
    of the decoded float32 tensor, and a NaN in one is named as it is for a checkpoint."""
    from quantkit.source.gguf_file import GGUFFile

    [(src, _)] = api.convert(model_cache("llama"), [f"gguf:{dtype}"], tmp_path / "src.gguf")
    g = GGUFFile(src)
    name = "blk.1.ffn_down.weight"
    assert torch.equal(g.stored(name).to(torch.float32), g.read(name))
    [(out, _)] = api.convert(src, ["gguf:Q4_K_M"], tmp_path / "q.gguf", threads=2)
    q = GGUFFile(out)
    codec = get_codec(q.type_name(name))
    expected = codec.encode(g.read(name).reshape(-1, g.shape(name)[-1])).numpy().reshape(-1)
    assert codec.name in ("Q4_K", "Q6_K") and (q.data(name) == expected).all()

    t = g.tensors[name]
    data = bytearray(src.read_bytes())
    data[t.offset + 6:t.offset + 8] = bytes([0x00, 0x7E]) if dtype == "F16" else bytes([0xC0, 0x7F])  # a NaN
    src.write_bytes(bytes(data))
    with pytest.raises(QuantkitError, match=rf"{name} has 1 NaN/Inf"):
        api.convert(src, ["gguf:Q8_0"], tmp_path / "bad.gguf", threads=2)
    assert not (tmp_path / "bad.gguf").exists()
