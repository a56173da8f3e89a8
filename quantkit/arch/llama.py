"""Llama (Llama 2/3, R1-Distill-Llama): GQA attention, SwiGLU MLP, default or llama3-scaled rope."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.arch.base import (
    Architecture,
    LayerSpec,
    LinearSpec,
    Rope,
    Weights,
    causal_attention,
    rms_norm,
    rope_parameters,
)


class LlamaArchitecture(Architecture):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    qkv_bias_default = False

    def __init__(self, config, tensor_names=None):
        super().__init__(config, tensor_names)
        self.num_heads = self._require("num_attention_heads")
        self.num_kv_heads = config.get("num_key_value_heads") or self.num_heads
        self.head_dim = config.get("head_dim") or self.hidden_size // self.num_heads
        self.intermediate_size = self._require("intermediate_size")
        self.qkv_bias = bool(config.get("attention_bias", self.qkv_bias_default))
        self.o_bias = bool(config.get("attention_bias", False))
        self.mlp_bias = bool(config.get("mlp_bias", False))
        self.rope = Rope(rope_parameters(config), self.head_dim, config.get("max_position_embeddings", 4096))

    def layer_spec(self, index: int) -> LayerSpec:
        p = f"model.layers.{index}."
        h, d, inter = self.hidden_size, self.head_dim, self.intermediate_size
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        linears = [
            LinearSpec(p + "self_attn.q_proj.weight", "attn_q", index, (q_out, h)),
            LinearSpec(p + "self_attn.k_proj.weight", "attn_k", index, (kv_out, h)),
            LinearSpec(p + "self_attn.v_proj.weight", "attn_v", index, (kv_out, h)),
            LinearSpec(p + "self_attn.o_proj.weight", "attn_output", index, (h, q_out)),
            LinearSpec(p + "mlp.gate_proj.weight", "ffn_gate", index, (inter, h)),
            LinearSpec(p + "mlp.up_proj.weight", "ffn_up", index, (inter, h)),
            LinearSpec(p + "mlp.down_proj.weight", "ffn_down", index, (h, inter)),
        ]
        others = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if self.qkv_bias:
            others.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if self.o_bias:
            others[p + "self_attn.o_proj.bias"] = (h,)
        if self.mlp_bias:
            others.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (h,)})
        return LayerSpec(index, linears, others)

    def layer_forward(self, index: int, weights: Weights, hidden: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        b, t, _ = hidden.shape

        def proj(name: str, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
            return F.linear(x, weights(p + name + ".weight"), weights(p + name + ".bias") if has_bias else None)

        x = rms_norm(hidden, weights(p + "input_layernorm.weight"), self.rms_norm_eps)
        q = proj("self_attn.q_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = proj("self_attn.k_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = proj("self_attn.v_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rope.cos_sin(positions)
        q, k = Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
        attn = causal_attention(q, k, v, self.head_dim ** -0.5)
        hidden = hidden + proj("self_attn.o_proj", attn, self.o_bias)

        x = rms_norm(hidden, weights(p + "post_attention_layernorm.weight"), self.rms_norm_eps)
        gated = F.silu(proj("mlp.gate_proj", x, self.mlp_bias)) * proj("mlp.up_proj", x, self.mlp_bias)
        return hidden + proj("mlp.down_proj", gated, self.mlp_bias)
