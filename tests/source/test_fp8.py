import pytest
import torch
from safetensors.torch import save_file

from quantkit.source import open_checkpoint
from quantkit.source.fp8 import dequantize_blocks
from quantkit.testing.factory import quantize_block_fp8


def _reference_float64(q: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """Element by element: fp8 value times its block's scale, in float64, written independently of the
    library (explicit index arithmetic, no repeat_interleave, no in-place views)."""
    rows, cols = q.shape
    row_block = torch.arange(rows) // block[0]
    col_block = torch.arange(cols) // block[1]
    return q.to(torch.float64) * scale.to(torch.float64)[row_block[:, None], col_block[None, :]]


@pytest.mark.parametrize("shape", [(256, 384), (128, 128), (300, 200), (576, 7 * 128 + 5), (1, 130), (129, 1)])
def test_block_dequant_equals_float64_exactly(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=gen) * 3
    q, scale = quantize_block_fp8(weight)
    # scales with full float32 significands, so the product needs more than float32 precision to be exact
    scale = scale * (1 + torch.rand(scale.shape, generator=gen))
    expected = _reference_float64(q, scale).to(torch.float32)
    got = dequantize_blocks(q, scale, (128, 128))
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_e5m2_and_nonsquare_blocks():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(70, 90, generator=gen).to(torch.float8_e5m2)
    scale = torch.rand(3, 2, generator=gen) + 0.5
    expected = _reference_float64(q, scale, block=(32, 64)).to(torch.float32)
    assert torch.equal(dequantize_blocks(q, scale, (32, 64)), expected)


@pytest.mark.parametrize("preset", ["deepseek_v3", "deepseek_v3-ragged"])
def test_checkpoint_reads_fp8_weights_dequantized(model_cache, preset):
    folder = model_cache(preset, fp8=True)
    with open_checkpoint(folder) as ckpt:
        names = {t.name for t in ckpt.tensors()}
        assert ckpt.is_fp8 and ckpt.fp8_block == (128, 128)
        assert not any(n.endswith("_scale_inv") for n in names), "scale tensors must be hidden from the listing"
        name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # ragged rows in both presets (rank + rope)
        info = ckpt.info(name)
        assert info.dtype == "F8_E4M3"
        # read the stored pair directly (bypassing the reader's dequantization) for the reference
        weight_file = ckpt._location[name]
        scale_file = ckpt._location[name + "_scale_inv"]
        assert weight_file is not scale_file, "the factory puts scales in another shard; the reader must follow"
        q = weight_file.read(name)
        scale = scale_file.read(name + "_scale_inv")
        got = ckpt.read(name)
        assert torch.equal(got, _reference_float64(q, scale).to(torch.float32))
        assert ckpt.read(name, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_single_file_fp8(tmp_path):
    q, scale = quantize_block_fp8(torch.randn(200, 130))
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": q, "a.weight_scale_inv": scale}, str(path))
    with open_checkpoint(path) as ckpt:
        assert [t.name for t in ckpt.tensors()] == ["a.weight"]
        assert torch.equal(ckpt.read("a.weight"), _reference_float64(q, scale).to(torch.float32))
