"""Llama (Llama 2/3, R1-Distill-Llama): GQA attention, SwiGLU MLP, default or llama3-scaled rope."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.arch.base import (
    Architecture,
    GGUFTensor,
    LayerSpec,
    LinearSpec,
    Rope,
    Weights,
    causal_attention,
    gguf_tensor,
    rms_norm,
    rope_inv_freq,
    rope_parameters,
)
from quantkit.errors import ConfigError
from quantkit.formats.gguf_file import Value, f32, string, u32


class LlamaArchitecture(Architecture):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    qkv_bias_default = False
    gguf_arch = "llama"
    rope_pairs_adjacent = True  # llama.cpp runs llama with NORM rope (pairs 2i, 2i+1): q/k rows are permuted

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

    # ---- GGUF ------------------------------------------------------------------------------------------
    def gguf_hparams(self) -> dict[str, Value]:
        a = self.gguf_arch
        hp = {f"{a}.context_length": u32(self.config.get("max_position_embeddings", 4096)),
              f"{a}.embedding_length": u32(self.hidden_size), f"{a}.block_count": u32(self.num_layers),
              f"{a}.feed_forward_length": u32(self.intermediate_size),
              f"{a}.attention.head_count": u32(self.num_heads), f"{a}.attention.head_count_kv": u32(self.num_kv_heads),
              f"{a}.rope.freq_base": f32(self.rope_params["rope_theta"]),
              f"{a}.attention.layer_norm_rms_epsilon": f32(self.rms_norm_eps),
              f"{a}.vocab_size": u32(self.vocab_size), f"{a}.rope.dimension_count": u32(self.head_dim)}
        if self.head_dim != self.hidden_size // self.num_heads:
            hp[f"{a}.attention.key_length"] = u32(self.head_dim)
            hp[f"{a}.attention.value_length"] = u32(self.head_dim)
        rope_type = self.rope_params["rope_type"]
        if rope_type == "linear":
            hp[f"{a}.rope.scaling.type"] = string("linear")
            hp[f"{a}.rope.scaling.factor"] = f32(self.rope_params["factor"])
        elif rope_type not in ("default", "llama3"):
            raise ConfigError(f"rope type {rope_type!r} cannot be written for llama.cpp's {a} architecture")
        return hp

    def gguf_extra_tensors(self) -> list[GGUFTensor]:
        if self.rope_params["rope_type"] != "llama3":
            return []
        # llama.cpp has no llama3 rope keys; it divides each rope frequency by rope_freqs[i] (convert_hf_to_gguf).
        base = rope_inv_freq({**self.rope_params, "rope_type": "default"}, self.head_dim, 0)[0]
        scaled = rope_inv_freq(self.rope_params, self.head_dim, 0)[0]
        factors = (base / scaled).float()

        def pieces(weights):
            yield factors.reshape(1, -1)

        return [GGUFTensor("rope_freqs.weight", tuple(factors.shape), pieces)]  # no checkpoint source

    def gguf_layer_tensors(self, index: int) -> list[GGUFTensor]:
        p, b = f"model.layers.{index}.", f"blk.{index}."
        spec = self.layer_spec(index)
        names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        heads = {"attn_q": self.num_heads, "attn_k": self.num_kv_heads}
        tensors = []
        for hf_name, shape in spec.tensor_shapes().items():
            stem, kind = hf_name[len(p):].rsplit(".", 1)
            gguf_name = names[stem]
            transform = inverse = None
            if self.rope_pairs_adjacent and gguf_name in heads:
                transform, inverse = _rope_pairs_permutation(heads[gguf_name])
            tensors.append(gguf_tensor(f"{b}{gguf_name}.{kind}", hf_name, shape, transform, inverse))
        return tensors

    def layer_forward(self, index: int, weights: Weights, hidden: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        b, t, _ = hidden.shape

        def proj(name: str, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
            return F.linear(x, weights(p + name + ".weight"), weights(p + name + ".bias") if has_bias else None)

        b_ = f"blk.{index}."
        x = rms_norm(hidden, weights(p + "input_layernorm.weight"), self.rms_norm_eps)
        for name in ("attn_q", "attn_k", "attn_v"):
            self._observe(f"{b_}{name}.weight", x)
        q = proj("self_attn.q_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = proj("self_attn.k_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = proj("self_attn.v_proj", x, self.qkv_bias).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rope.cos_sin(positions)
        q, k = Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
        attn = causal_attention(q, k, v, self.head_dim ** -0.5)
        self._observe(b_ + "attn_output.weight", attn)
        hidden = hidden + proj("self_attn.o_proj", attn, self.o_bias)

        x = rms_norm(hidden, weights(p + "post_attention_layernorm.weight"), self.rms_norm_eps)
        self._observe(b_ + "ffn_gate.weight", x)
        self._observe(b_ + "ffn_up.weight", x)
        gated = F.silu(proj("mlp.gate_proj", x, self.mlp_bias)) * proj("mlp.up_proj", x, self.mlp_bias)
        self._observe(b_ + "ffn_down.weight", gated)
        return hidden + proj("mlp.down_proj", gated, self.mlp_bias)



def _rope_pairs_permutation(n_heads: int):
    """HF's rotate-half rows (i, i + d/2) of each head -> adjacent pairs (2i, 2i + 1), as convert_hf_to_gguf's
    LlamaModel.permute; only output rows move, so input columns (and importance vectors) are unchanged."""

    def permute(w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0]
        return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    def unpermute(w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0]
        return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    return permute, unpermute
