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
def test_workers_give_the_inline_bytes_in_order(name, weighted, workers):
    importance = torch.rand(512, generator=torch.Generator().manual_seed(1)) if weighted else None
    jobs = _jobs(name, importance, chunks=9)  # more than the two in flight per worker
    writers = [_Writer(), _Writer()]
    used_processes = _encode(gguf.ChunkEncoder(2), jobs, writers)
    assert used_processes == (workers == "processes" and gguf._CAN_FORK)
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
