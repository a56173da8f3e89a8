"""Damaged checkpoints give a QuantkitError naming the file and the problem; the CLI prints it without a
traceback and exits non-zero."""

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.model import Model


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    # offsets are relative to the data section, so a new header length keeps them valid
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _shard_holding(folder, name):
    return folder / _index(folder)["weight_map"][name]


def _missing_shard(folder):
    shard = _shards(folder)[-1]
    shard.unlink()
    return shard.name, "missing"


def _tensor_not_in_shard(folder):
    index = _index(folder)
    shard = _shards(folder)[0].name
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = shard
    _write_index(folder, index)
    return shard, "does not contain"


def _truncated(folder):
    shard = _shards(folder)[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    return shard.name, "truncated"


def _corrupt_header(folder):
    shard = _shards(folder)[1]
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\x00garbage\xff\xfe!!!!!!"
    shard.write_bytes(bytes(data))
    return shard.name, "corrupt"


def _unknown_dtype(folder):
    shard = _shards(folder)[0]

    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = "F4_E2M1"

    _rewrite_header(shard, edit)
    return shard.name, "unknown dtype"


def _fp8_without_scale(folder):
    weight = "model.layers.1.self_attn.o_proj.weight"
    scale = weight + "_scale_inv"
    shard = _shard_holding(folder, scale)
    tensors = load_file(str(shard))
    del tensors[scale]
    save_file(tensors, str(shard))
    index = _index(folder)
    del index["weight_map"][scale]
    _write_index(folder, index)
    return _shard_holding(folder, weight).name, "no 'model.layers.1.self_attn.o_proj.weight_scale_inv'"


def _fp8_scale_wrong_shape(folder):
    scale = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    shard = _shard_holding(folder, scale)
    tensors = load_file(str(shard))
    tensors[scale] = torch.ones(1, 1)
    save_file(tensors, str(shard))
    return shard.name, "shape"


def _missing_config(folder):
    (folder / "config.json").unlink()
    return "config.json", "config.json"


def _unsupported_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    config["architectures"], config["model_type"] = ["MambaForCausalLM"], "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    return folder.name, "unsupported architecture: config.json declares architectures [MambaForCausalLM]"


def _missing_tensor(folder):
    name = "model.layers.1.mlp.down_proj.weight"
    shard = _shard_holding(folder, name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard))
    index = _index(folder)
    del index["weight_map"][name]
    _write_index(folder, index)
    return folder.name, "missing"


CASES = {
    "missing_shard": ("llama", {}, _missing_shard),
    "tensor_not_in_shard": ("llama", {}, _tensor_not_in_shard),
    "truncated": ("llama", {}, _truncated),
    "corrupt_header": ("llama", {}, _corrupt_header),
    "unknown_dtype": ("llama", {}, _unknown_dtype),
    "fp8_without_scale": ("deepseek_v3", {"fp8": True}, _fp8_without_scale),
    "fp8_scale_wrong_shape": ("deepseek_v3", {"fp8": True}, _fp8_scale_wrong_shape),
    "missing_config": ("qwen2", {}, _missing_config),
    "unsupported_architecture": ("qwen2", {}, _unsupported_architecture),
    "tensor_missing_from_checkpoint": ("llama", {}, _missing_tensor),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(copy_model, case):
    preset, kwargs, damage = CASES[case]
    folder = copy_model(preset, **kwargs)
    names_file, problem = damage(folder)

    with pytest.raises(QuantkitError) as err:
        Model(folder)
    assert names_file in str(err.value)
    assert problem.lower() in str(err.value).lower()

    result = CliRunner().invoke(main, ["inspect", str(folder)])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # no other exception escaped
    assert result.output.startswith("error: ") and names_file in result.output
    assert "Traceback" not in result.output


def test_missing_path():
    result = CliRunner().invoke(main, ["inspect", "/nonexistent/model"])
    assert result.exit_code == 2 and "no such file or folder" in result.output
