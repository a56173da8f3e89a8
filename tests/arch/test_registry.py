import pytest

from quantkit.arch import load_architecture
from quantkit.errors import ConfigError, UnsupportedArchitectureError
from quantkit.testing.factory import PRESETS


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_architecture({"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    message = str(err.value)
    assert "MambaForCausalLM" in message
    for supported in ("llama", "qwen2", "deepseek_v3"):
        assert supported in message


def test_model_type_fallback_and_transformers_saved_deepseek_config():
    config = dict(PRESETS["deepseek_v3"])
    del config["architectures"], config["scoring_func"], config["topk_method"]  # as transformers >= 5 saves it
    arch = load_architecture(config)
    assert arch.name == "deepseek_v3"


def test_unsupported_routing_is_a_clear_error():
    with pytest.raises(ConfigError, match="softmax"):
        load_architecture({**PRESETS["deepseek_v3"], "scoring_func": "softmax"})


def test_missing_config_key_names_it():
    config = dict(PRESETS["llama"])
    del config["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        load_architecture(config)


def test_deepseek_layers_dense_then_moe_and_mtp_skipped():
    arch = load_architecture(PRESETS["deepseek_v3"])
    layers = arch.layers()
    assert layers[0].routed_experts == 0
    assert all(layer.routed_experts == 8 and layer.experts_per_token == 2 for layer in layers[1:])
    roles = {lin.role for lin in layers[1].linears}
    assert {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
            "self_attn.o_proj", "mlp.experts.gate_proj", "mlp.shared_experts.down_proj"} <= roles
    assert arch.is_skipped(f"model.layers.{arch.num_layers}.eh_proj.weight")
    assert not arch.is_skipped("model.layers.0.self_attn.o_proj.weight")
