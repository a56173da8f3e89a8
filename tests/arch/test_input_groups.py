"""Input groups: every quantizable linear belongs to exactly one group, the forward reports each group's input
under its key with the width its linears read, and producers are tensors of the layer."""

import pytest
import torch

from quantkit.arch import load_architecture
from quantkit.model import Model

PRESETS = [("llama", {}), ("qwen2-tied", {}), ("deepseek_v3", {"fp8": True}),
           ("deepseek_v3", {"fused_experts": True})]


@pytest.mark.parametrize(("preset", "kwargs"), PRESETS)
def test_groups_cover_every_linear_once_and_match_the_forward(model_cache, preset, kwargs):
    with Model(model_cache(preset, **kwargs)) as model:
        arch = model.arch
        observed: dict[str, set[int]] = {}

        def observe(key, x, index, count):
            observed.setdefault(key, set()).add(x.shape[-1])

        arch.observe = observe
        arch.forward(model.weights(), torch.randint(3, 500, (1, 48), generator=torch.Generator().manual_seed(1)))
        arch.observe = None
        for spec in arch.layers():
            shapes = spec.tensor_shapes()
            grouped = [(w, g.expert) for g in spec.input_groups for w in g.linears]
            routers = {g.linears[0] for g in spec.input_groups if g.key.endswith("mlp.gate")}
            linears = [(lin.name, lin.expert) for lin in spec.linears]
            if arch.name == "deepseek_v3" and getattr(arch, "fused_experts", False) and spec.routed_experts:
                # a fused 3-D expert tensor is shared by every expert's group, one slice each
                grouped = list(dict.fromkeys((w, None) for w, _ in grouped))
            assert sorted(grouped, key=str) == sorted(linears + [(r, None) for r in routers], key=str)
            for g in spec.input_groups:
                assert g.kind in ("norm", "linear", "attention")
                if g.kind != "attention":
                    assert g.producer in shapes, g
                if g.expert is None or g.key in observed:  # an expert no token reached reports nothing
                    in_width = shapes[g.linears[0]][-1]
                    assert observed.pop(g.key) == {in_width}, g.key
        assert not observed, f"observed keys with no input group: {sorted(observed)}"


def test_probes_are_reported_only_when_asked(model_cache):
    with Model(model_cache("deepseek_v3", fp8=True)) as model:
        arch, seen = model.arch, set()
        arch.observe = lambda key, x, index, count: seen.add(key)
        ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(2))
        arch.forward(model.weights(), ids)
        assert not any(k.endswith(("absorbed_k", "absorbed_v")) for k in seen)
        arch.observe_probes = True
        arch.forward(model.weights(), ids)
        arch.observe, arch.observe_probes = None, False
        assert "model.layers.0.self_attn.absorbed_k" in seen and "model.layers.1.self_attn.absorbed_v" in seen


def test_awq_folding_points_follow_the_architecture():
    from quantkit.testing.factory import PRESETS as CONFIGS

    llama = load_architecture(CONFIGS["llama"]).layer_spec(0)
    by_key = {g.key: g for g in llama.input_groups}
    p = "model.layers.0."
    assert by_key[p + "self_attn.q_proj"].producer == p + "input_layernorm.weight"
    assert by_key[p + "mlp.down_proj"].producer == p + "mlp.up_proj.weight"
    o = by_key[p + "self_attn.o_proj"]  # the preset uses GQA: v_proj and o_proj differ in shape, nothing folds
    assert o.kind == "attention"
    deepseek = load_architecture(CONFIGS["deepseek_v3"]).layer_spec(1)
    by_key = {g.key: g for g in deepseek.input_groups}
    assert by_key["model.layers.1.self_attn.kv_b_proj"].producer.endswith("kv_a_layernorm.weight")
    experts = [g for g in deepseek.input_groups if g.expert is not None]
    assert {g.producer for g in experts if g.key.endswith("gate_proj")} == {
        "model.layers.1.post_attention_layernorm.weight"}


def test_kv_cache_layout():
    from quantkit.testing.factory import PRESETS as CONFIGS

    llama = load_architecture(CONFIGS["llama"])
    layout = llama.kv_cache_layout()
    assert layout.k_per_token == (llama.num_kv_heads * llama.head_dim,) * llama.num_layers == layout.v_per_token
    deepseek = load_architecture(CONFIGS["deepseek_v3"])
    layout = deepseek.kv_cache_layout()
    assert layout.latent and set(layout.k_per_token) == {deepseek.kv_lora_rank + deepseek.qk_rope_head_dim}
