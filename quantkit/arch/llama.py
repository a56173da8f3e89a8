"""Llama (Llama 2/3, R1-Distill-Llama): GQA attention, SwiGLU MLP, default or llama3-scaled rope."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.arch.base import (
    Architecture,
    InputGroup,
    KVCacheLayout,
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
        self.rope_params = rope_parameters(config)
        self.rope = Rope(self.rope_params, self.head_dim, config.get("max_position_embeddings", 4096))

    def layer_spec(self, index: int) -> LayerSpec:
        p = f"model.layers.{index}."
        h, d, inter = self.hidden_size, self.head_dim, self.intermediate_size
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        shapes = {"self_attn.q_proj": (q_out, h), "self_attn.k_proj": (kv_out, h), "self_attn.v_proj": (kv_out, h),
                  "self_attn.o_proj": (h, q_out), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}
        linears = [LinearSpec(f"{p}{role}.weight", role, index, shape) for role, shape in shapes.items()]
        others = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if self.qkv_bias:
            others.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if self.o_bias:
            others[p + "self_attn.o_proj.bias"] = (h,)
        if self.mlp_bias:
            others.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (h,)})
        w = {role: f"{p}{role}.weight" for role in shapes}
        groups = [
            InputGroup(p + "self_attn.q_proj", (w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]),
                       p + "input_layernorm.weight", "norm"),
            # o_proj reads the attention's output, a head-wise mix of v_proj's rows: scales fold into v_proj
            # only when the two weights have the same shape (no GQA), as AutoAWQ does
            InputGroup(p + "self_attn.o_proj", (w["self_attn.o_proj"],),
                       *((w["self_attn.v_proj"], "linear") if (kv_out, h) == (h, q_out) else (p + "self_attn",
                                                                                            "attention"))),
            InputGroup(p + "mlp.gate_proj", (w["mlp.gate_proj"], w["mlp.up_proj"]),
                       p + "post_attention_layernorm.weight", "norm"),
            InputGroup(p + "mlp.down_proj", (w["mlp.down_proj"],), w["mlp.up_proj"], "linear"),
        ]
        return LayerSpec(index, linears, others, groups)

    def kv_cache_layout(self) -> KVCacheLayout:
        per_layer = (self.num_kv_heads * self.head_dim,) * self.num_layers
        return KVCacheLayout(per_layer, per_layer)

    def layer_forward(self, index: int, weights: Weights, hidden: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        x = rms_norm(hidden, weights(p + "input_layernorm.weight"), self.rms_norm_eps)
        hidden = hidden + self._attention(p, weights, x, positions)
        x = rms_norm(hidden, weights(p + "post_attention_layernorm.weight"), self.rms_norm_eps)
        return hidden + self._mlp(p, weights, x)

    def norm_block(self, index: int, norm: str, weights: Weights, x: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        if norm == p + "input_layernorm.weight":
            return self._attention(p, weights, x, positions)
        if norm == p + "post_attention_layernorm.weight":
            return self._mlp(p, weights, x)
        raise KeyError(f"{norm} feeds no block of layer {index}")

    def _proj(self, p: str, weights: Weights, name: str, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
        return F.linear(x, weights(p + name + ".weight"), weights(p + name + ".bias") if has_bias else None)

    def _attention(self, p: str, weights: Weights, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        self._observe(p + "self_attn.q_proj", x)
        q = self._proj(p, weights, "self_attn.q_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self._proj(p, weights, "self_attn.k_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self._proj(p, weights, "self_attn.v_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rope.cos_sin(positions)
        q, k = Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
        attn = causal_attention(q, k, v, self.head_dim ** -0.5)
        self._observe(p + "self_attn.o_proj", attn)
        return self._proj(p, weights, "self_attn.o_proj", attn, self.o_bias)

    def _mlp(self, p: str, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        self._observe(p + "mlp.gate_proj", x)
        gated = F.silu(self._proj(p, weights, "mlp.gate_proj", x, self.mlp_bias)) * self._proj(
            p, weights, "mlp.up_proj", x, self.mlp_bias)
        self._observe(p + "mlp.down_proj", gated)
        return self._proj(p, weights, "mlp.down_proj", gated, self.mlp_bias)
