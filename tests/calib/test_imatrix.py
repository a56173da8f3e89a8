"""Importance matrices: what is collected for each llama.cpp matmul, the two file formats, and their use."""

import struct

import pytest
import torch
from click.testing import CliRunner

from quantkit import convert as api
from quantkit.calib import Imatrix, collect_imatrix
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.model import Model
from quantkit.source.gguf_file import GGUFFile


def _tokens(n=4 * 64):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(0))


def test_llama_entries_are_mean_squared_inputs(model_cache):
    with Model(model_cache("llama")) as model:
        im = collect_imatrix(model, _tokens(), ctx=64)
        assert im.chunk_count == 4 and im.chunk_size == 64
        names = {f"blk.{i}.{n}.weight" for i in range(2)
                 for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
        assert set(im.sums) == names
        assert torch.equal(im.sums["blk.0.attn_q.weight"], im.sums["blk.0.attn_k.weight"])  # same input
        assert im.counts["blk.1.ffn_down.weight"].tolist() == [256]
        # layer 0's q/k/v input is the normed embedding: check one column by hand
        emb = model.source.read("model.embed_tokens.weight")[_tokens()]
        norm = model.source.read("model.layers.0.input_layernorm.weight")
        x = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-6) * norm
        expected = (x.double() ** 2).mean(0)
        assert torch.allclose(im.importance("blk.0.attn_q.weight").double(), expected, rtol=1e-5)


def test_deepseek_experts_heads_and_unused_experts(model_cache, caplog):
    with Model(model_cache("deepseek_v3", fp8=True)) as model:
        im = collect_imatrix(model, _tokens(), ctx=64)
    counts = im.expert_counts()
    routed = counts["blk.1.ffn_down_exps.weight"]
    assert len(routed) == 8 and sum(routed) == 2 * 256  # top-2 of 256 tokens
    assert im.sums["blk.1.ffn_gate_exps.weight"].shape == (8, 256)
    assert im.sums["blk.0.attn_k_b.weight"].shape == (2, 64) and im.counts["blk.0.attn_k_b.weight"].tolist() == [256]
    assert im.sums["blk.0.attn_v_b.weight"].shape == (2, 128)
    assert im.importance("blk.1.ffn_up_exps.weight").shape == (8 * 256,)
    # an expert without tokens gets importance 1.0 (llama.cpp's "partial data" rule)
    im.sums["blk.1.ffn_up_exps.weight"][3] = 0
    im.counts["blk.1.ffn_up_exps.weight"][3] = 0
    assert torch.all(im.importance("blk.1.ffn_up_exps.weight").view(8, 256)[3] == 1.0)


def test_gguf_and_legacy_files_round_trip(model_cache, tmp_path):
    with Model(model_cache("deepseek_v3")) as model:
        im = collect_imatrix(model, _tokens(), ctx=64, dataset="calib.txt")
    expected = im.importances()
    gguf_file = im.save(tmp_path / "imatrix.gguf")
    dat_file = im.save(tmp_path / "imatrix.dat")
    loaded = Imatrix.load(gguf_file)
    assert loaded.datasets == ["calib.txt"] and loaded.chunk_count == 4 and loaded.chunk_size == 64
    assert all(torch.equal(loaded.importances()[k], v) for k, v in expected.items())
    legacy = Imatrix.load(dat_file).importances()
    assert all(torch.allclose(legacy[k], v, rtol=1e-6) for k, v in expected.items())
    raw = dat_file.read_bytes()
    assert struct.unpack_from("<i", raw)[0] == len(expected)
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00")
    with pytest.raises(QuantkitError, match="not a GGUF imatrix"):
        Imatrix.load(tmp_path / "junk.dat")


def test_convert_with_imatrix_uses_it(model_cache, tmp_path):
    folder = model_cache("deepseek_v3")
    runner = CliRunner()
    result = runner.invoke(main, ["imatrix", str(folder), "--ctx", "64", "--chunks", "3",
                                  "-o", str(tmp_path / "im.gguf")])
    assert result.exit_code == 0, result.output
    assert "tokens per expert" in result.output
    [(plain, _)] = api.convert(folder, ["gguf:Q4_0"], tmp_path / "plain.gguf")
    [(weighted, _)] = api.convert(folder, ["gguf:Q4_0"], tmp_path / "weighted.gguf", imatrix=tmp_path / "im.gguf")
    a, b = GGUFFile(plain), GGUFFile(weighted)
    assert b.metadata("quantize.imatrix.chunks_count") == 3
    assert not torch.equal(a.read("blk.1.ffn_up_exps.weight"), b.read("blk.1.ffn_up_exps.weight"))
    assert torch.equal(a.read("token_embd.weight"), b.read("token_embd.weight"))  # no entry: no imatrix
