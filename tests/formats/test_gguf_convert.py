"""HF -> GGUF conversion: tensors round-trip exactly, metadata is typed as llama.cpp reads it, outputs are
atomic, splits carry gguf-split's keys, and bad input is reported without leaving files behind."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType

from quantkit import convert as api
from quantkit.arch import load_architecture
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.model import Model
from quantkit.source.gguf_file import GGUFFile

PRESETS = [("llama", {}), ("llama-rope3", {}), ("qwen2-tied", {}), ("deepseek_v3", {"fp8": True}),
           ("deepseek_v3", {"fused_experts": True})]


@pytest.mark.parametrize(("preset", "kwargs"), PRESETS)
def test_f32_gguf_reproduces_the_source_forward(model_cache, tmp_path, preset, kwargs):
    folder = model_cache(preset, **kwargs)
    [(path, plan)] = api.convert(folder, ["gguf:F32"], tmp_path / "m.gguf")
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    with Model(folder) as model:
        expected = model.forward(ids)
    arch = load_architecture(json.loads((folder / "config.json").read_text()))  # per-expert names
    got = arch.forward(mapping_for(arch).weights_from_gguf(GGUFFile(path).read), ids)
    assert torch.equal(got, expected)
    assert path.stat().st_size > plan.total_bytes


def test_llama_metadata_types_and_tokenizer(model_cache, tmp_path):
    folder = model_cache("llama-rope3")
    [(path, _)] = api.convert(folder, ["gguf:Q8_0"], tmp_path / "m.gguf")
    reader = GGUFReader(path)
    fields = reader.fields
    assert next(iter(fields)) == "GGUF.version" and list(fields)[3] == "general.architecture"

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("general.file_type") == 7 and value("general.quantization_version") == 2
    assert fields["llama.block_count"].types == [GGUFValueType.UINT32]
    assert fields["llama.rope.freq_base"].types == [GGUFValueType.FLOAT32]
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "qwen2"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 512 and tokens[0] == "<|begin_of_text|>"
    assert value("tokenizer.ggml.token_type")[0] == 3  # special -> CONTROL
    assert all(" " in m for m in value("tokenizer.ggml.merges")[:20])
    assert value("tokenizer.ggml.bos_token_id") == 0 and value("tokenizer.ggml.eos_token_id") == 1
    assert "{{ bos_token }}" in value("tokenizer.chat_template")
    rope_freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"][0]
    assert rope_freqs.data.shape == (16,) and rope_freqs.data.max() == 8.0 and rope_freqs.data.min() == 1.0


def test_deepseek_metadata_is_mla_profile(model_cache, tmp_path):
    [(path, plan)] = api.convert(model_cache("deepseek_v3", fp8=True), ["gguf:Q8_0"], tmp_path / "m.gguf")
    g = GGUFFile(path)
    assert g.metadata("general.architecture") == "deepseek2"
    assert g.metadata("deepseek2.attention.head_count_kv") == 1
    assert g.metadata("deepseek2.attention.key_length") == 128 + 64
    assert g.metadata("deepseek2.attention.key_length_mla") == 128
    assert g.metadata("deepseek2.expert_gating_func") == 2 and g.metadata("deepseek2.expert_weights_norm") is True
    assert g.metadata("deepseek2.leading_dense_block_count") == 1
    assert g.shape("blk.1.ffn_gate_exps.weight") == (8, 128, 256)
    assert g.shape("blk.0.attn_k_b.weight") == (2, 128, 64) and g.shape("blk.0.attn_v_b.weight") == (2, 64, 128)
    assert g.type_name("blk.1.exp_probs_b.bias") == "F32" and g.type_name("blk.1.ffn_gate_inp.weight") == "F32"
    assert not any(name.startswith("blk.3.") for name in g.tensors)  # the MTP layer is dropped
    assert plan.schemes["blk.0.attn_k_b.weight"] == "Q8_0"


def test_several_targets_share_one_read(model_cache, tmp_path):
    results = api.convert(model_cache("qwen2-tied"), ["gguf:Q8_0", "gguf:F16", "gguf:Q4_0"], tmp_path)
    assert [p.name for p, _ in results] == ["qwen2-tied-Q8_0.gguf", "qwen2-tied-F16.gguf", "qwen2-tied-Q4_0.gguf"]
    q4 = GGUFFile(tmp_path / "qwen2-tied-Q4_0.gguf")
    assert q4.type_name("token_embd.weight") == "Q8_0"  # tied: the output rule, and 128-wide rows fall back


def test_existing_output_needs_force_and_is_replaced_atomically(model_cache, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(QuantkitError, match="--force"):
        api.convert(model_cache("llama"), ["gguf:Q8_0"], out)
    assert out.read_bytes() == b"keep me"
    api.convert(model_cache("llama"), ["gguf:Q8_0"], out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert list(tmp_path.iterdir()) == [out]


def test_interrupted_run_leaves_nothing_under_the_final_name(model_cache, tmp_path):
    def interrupt(event):
        if event.done > event.total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.convert(model_cache("llama"), ["gguf:Q8_0", "gguf:F16"], tmp_path, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_nan_weight_is_named(copy_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model("llama")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = folder / index[name]
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(QuantkitError, match=r"blk\.1\.ffn_down\.weight has 1 NaN/Inf"):
        api.convert(folder, ["gguf:Q8_0"], out)
    assert not out.exists() or list(out.iterdir()) == []


def test_split_shards_follow_gguf_split(model_cache, tmp_path):
    folder = model_cache("llama")
    [(single, _)] = api.convert(folder, ["gguf:F16"], tmp_path / "one.gguf")
    [(first, _)] = api.convert(folder, ["gguf:F16"], tmp_path / "split.gguf", split_max_size="100K")
    shards = sorted(tmp_path.glob("split-*.gguf"))
    assert first == shards[0] and len(shards) > 2
    assert shards[0].name == f"split-00001-of-{len(shards):05d}.gguf"
    whole = {t.name: np.array(t.data) for t in GGUFReader(single).tensors}
    seen = {}
    for i, shard in enumerate(shards):
        reader = GGUFReader(shard)
        assert reader.fields["split.no"].contents() == i
        assert reader.fields["split.count"].contents() == len(shards)
        assert reader.fields["split.tensors.count"].contents() == len(whole)
        assert ("general.architecture" in reader.fields) == (i == 0)
        seen.update({t.name: np.array(t.data) for t in reader.tensors})
    assert seen.keys() == whole.keys() and all(np.array_equal(seen[k], whole[k]) for k in whole)

    # quantkit reads the set through its first shard, as llama.cpp does: every tensor, the size of every shard
    from quantkit.source.gguf_file import GGUFFile

    split, one = GGUFFile(first), GGUFFile(single)
    assert split.tensors.keys() == one.tensors.keys()
    assert all(np.array_equal(split.data(k), one.data(k)) for k in whole)
    assert split.size_on_disk() == sum(p.stat().st_size for p in shards)
    with pytest.raises(QuantkitError, match="give its first shard"):
        GGUFFile(shards[1])
    shards[-1].unlink()
    with pytest.raises(QuantkitError, match=f"missing {shards[-1].name}"):
        GGUFFile(first)


def test_cli_dry_run_and_bad_type(model_cache, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(model_cache("deepseek_v3")), "--to", "gguf:Q4_K_M", "--dry-run",
                                  "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "blk.0.attn_k_b.weight" in result.output and "bpw" in result.output
    assert list(tmp_path.iterdir()) == []
    bad = runner.invoke(main, ["convert", str(model_cache("llama")), "--to", "gguf:Q4_X"])
    assert bad.exit_code == 2 and "Q4_K_M" in bad.output and "Traceback" not in bad.output


def test_header_reader_agrees_with_gguf_py_and_rejects_truncation(model_cache, tmp_path):
    [(path, _)] = api.convert(model_cache("deepseek_v3", fp8=True), ["gguf:Q4_K_M"], tmp_path / "m.gguf")
    ours, theirs = GGUFFile(path), GGUFReader(path)
    expected = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.values) == list(expected)
    for key, field in expected.items():
        value = ours.values[key]
        assert value.type == field.types[0] and (value.item_type is None or value.item_type == field.types[-1]), key
        assert value.value == field.contents(), key
    for t in theirs.tensors:
        assert ours.type_name(t.name) == t.tensor_type.name
        assert ours.shape(t.name) == tuple(int(x) for x in reversed(t.shape.tolist()))
        assert np.array_equal(ours.data(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    with pytest.raises(QuantkitError, match="runs past the end of the file"):
        GGUFFile(cut)
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(QuantkitError, match="corrupt or truncated GGUF header"):
        GGUFFile(cut)
    cut.write_bytes(b"GGML" + path.read_bytes()[4:])
    with pytest.raises(QuantkitError, match="not a GGUF file"):
        GGUFFile(cut)
