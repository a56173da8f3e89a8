"""quantkit's layer-by-layer reference forward against transformers on the same folder, float32."""

import json

import pytest
import torch
from safetensors.torch import save_file

from quantkit.model import Model
from quantkit.source import open_checkpoint

transformers = pytest.importorskip("transformers")

MAX_REL_ERR = 1e-4
CASES = [("llama", {}), ("llama-rope3", {}), ("qwen2", {}), ("qwen2-tied", {}), ("deepseek_v3", {}),
         ("deepseek_v3", {"fused_experts": True}), ("deepseek_v3-ragged", {})]


def _tokens(folder) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "def route(tokens, experts):\n    return sorted(experts, key=lambda e: -e.score)[:2]  # top-k\n" * 3
    return torch.tensor([tok.encode(text)[:96]])


def _transformers_logits(folder, ids) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def _rel_err(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("preset,kwargs", CASES, ids=[p + "".join(f"-{k}" for k in kw) for p, kw in CASES])
def test_reference_forward_matches_transformers(model_cache, preset, kwargs):
    folder = model_cache(preset, **kwargs)
    ids = _tokens(folder)
    with Model(folder) as model:
        ours = model.forward(ids)
    ref = _transformers_logits(folder, ids)
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) < MAX_REL_ERR


def test_fp8_folder_matches_transformers_on_dequantized_weights(model_cache, tmp_path):
    """transformers runs on a float32 copy made from the FP8 folder; quantkit reads the FP8 folder itself."""
    folder = model_cache("deepseek_v3", fp8=True)
    dequantized = tmp_path / "dequantized"
    dequantized.mkdir()
    with open_checkpoint(folder) as ckpt:
        save_file({t.name: ckpt.read(t.name) for t in ckpt.tensors()}, str(dequantized / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (dequantized / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dequantized / name).write_bytes((folder / name).read_bytes())

    ids = _tokens(folder)
    with Model(folder) as model:
        ours = model.forward(ids)
    assert _rel_err(ours, _transformers_logits(dequantized, ids)) < MAX_REL_ERR


def test_rope_scaling_and_routing_change_the_output(model_cache):
    """Guards against a comparison that passes because both sides ignore a feature."""
    folder = model_cache("llama-rope3")
    ids = _tokens(folder)
    with Model(folder) as model:
        scaled = model.forward(ids)
        model.arch.rope.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 32, 2).float() / 32))
        unscaled = model.forward(ids)
    assert _rel_err(unscaled, scaled) > 1e-3

    folder = model_cache("deepseek_v3")
    with Model(folder) as model:
        routed = model.forward(ids)
        model.arch.routed_scaling_factor = 1.0
        assert _rel_err(model.forward(ids), routed) > 1e-3
