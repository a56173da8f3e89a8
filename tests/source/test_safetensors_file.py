import torch
from safetensors.torch import load_file, save_file

from quantkit.source.safetensors_file import _CHUNK_BYTES, SafetensorsFile


def test_reads_match_safetensors_across_chunks_and_dtypes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    big = _CHUNK_BYTES // 4 * 2 + 1234  # several chunks with a ragged last one
    tensors = {
        "big_f32": torch.randn(big, generator=gen),
        "big_bf16": torch.randn(big // 1000, 1000, generator=gen).to(torch.bfloat16),
        "fp8": torch.randn(300, 200, generator=gen).to(torch.float8_e4m3fn),
        "ints": torch.arange(10, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    expected = load_file(str(path))
    f = SafetensorsFile(path)
    for name, ref in expected.items():
        got = f.read(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))  # bit-exact
        if ref.dtype.is_floating_point:
            assert torch.equal(f.read(name, dtype=torch.float32), ref.float())
    f.close()
