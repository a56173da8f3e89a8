"""`quantkit imatrix` refuses NaN/Inf weights and statistics that overflow, naming the tensor, writing nothing."""

import json

from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.cli import main


def _set(folder, name, fill):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index[name]
    tensors = load_file(shard)
    fill(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


def _imatrix(folder, out):
    return CliRunner().invoke(main, ["imatrix", str(folder), "--ctx", "64", "--chunks", "2", "-o", str(out)])


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


def test_nan_weight_is_named_and_nothing_written(copy_model, tmp_path):
    folder = copy_model("llama")
    _set(folder, "model.layers.1.mlp.down_proj.weight", lambda t: t.__setitem__((3, 5), float("nan")))
    out = tmp_path / "out" / "imatrix.gguf"
    line = _error(_imatrix(folder, out))
    assert line.startswith("error: tensor model.layers.1.mlp.down_proj.weight has 1 NaN/Inf value(s)"), line
    assert not out.parent.exists()


def test_overflowing_statistics_are_refused(copy_model, tmp_path):
    """Finite weights whose products overflow float32: ffn_down's input becomes inf."""
    folder = copy_model("llama")
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        _set(folder, name, lambda t: t.fill_(1e20))
    out = tmp_path / "out" / "imatrix.gguf"
    line = _error(_imatrix(folder, out))
    assert line.startswith("error: imatrix entry blk.0.ffn_down.weight became NaN/Inf in layer 0"), line
    assert not out.parent.exists()
