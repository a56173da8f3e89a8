"""DeepSeek-V3 / R1: MLA attention (low-rank q and kv, decoupled rope key), YaRN rope, and MoE layers with
sigmoid scoring, a score-correction bias, group-limited top-k and shared experts after the leading dense
layers. Multi-token-prediction layers (index >= num_hidden_layers) are recognised and skipped.

Routed experts are read in either layout: one 2-D tensor per expert as DeepSeek ships them
(`mlp.experts.N.gate_proj.weight`), or fused 3-D tensors as transformers >= 5 saves them
(`mlp.experts.gate_up_proj` [E, 2*I, H], `mlp.experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import re
from collections.abc import Callable

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
    swiglu,
    yarn_mscale,
)
from quantkit.errors import ConfigError

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV3Architecture(Architecture):
    name = "deepseek_v3"
    hf_architectures = ("DeepseekV3ForCausalLM",)
    model_types = ("deepseek_v3",)

    def __init__(self, config, tensor_names=None):
        super().__init__(config, tensor_names)
        c = config
        self.num_heads = self._require("num_attention_heads")
        self.q_lora_rank = c.get("q_lora_rank")
        self.kv_lora_rank = self._require("kv_lora_rank")
        self.qk_nope_head_dim = self._require("qk_nope_head_dim")
        self.qk_rope_head_dim = self._require("qk_rope_head_dim")
        self.v_head_dim = self._require("v_head_dim")
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.intermediate_size = self._require("intermediate_size")
        self.moe_intermediate_size = c.get("moe_intermediate_size", 0)
        self.n_routed_experts = c.get("n_routed_experts") or 0
        self.n_shared_experts = c.get("n_shared_experts") or 0
        self.experts_per_token = c.get("num_experts_per_tok") or 0
        self.first_k_dense_replace = c.get("first_k_dense_replace") or 0
        self.moe_layer_freq = c.get("moe_layer_freq") or 1
        self.n_group = c.get("n_group") or 1
        self.topk_group = c.get("topk_group") or self.n_group
        self.norm_topk_prob = bool(c.get("norm_topk_prob", True))
        self.routed_scaling_factor = float(c.get("routed_scaling_factor", 1.0))
        self.rope_interleave = bool(c.get("rope_interleave", True))
        # transformers drops these two keys when it saves a config; absent means DeepSeek-V3's choice.
        scoring, topk_method = c.get("scoring_func", "sigmoid"), c.get("topk_method", "noaux_tc")
        if scoring != "sigmoid" or topk_method != "noaux_tc":
            raise ConfigError(f"deepseek_v3 with scoring_func={scoring!r}, topk_method={topk_method!r} is not "
                              "supported; quantkit implements DeepSeek-V3/R1 routing (sigmoid, noaux_tc)")
        if self.n_routed_experts and self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")

        params = rope_parameters(c)
        self.rope = Rope(params, self.qk_rope_head_dim, c.get("max_position_embeddings", 4096))
        self.softmax_scale = self.qk_head_dim ** -0.5
        if params["rope_type"] != "default" and params.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
        # Called as on_route(layer index, expert indices [tokens, k]) by every MoE layer of the forward.
        self.on_route: Callable[[int, torch.Tensor], None] | None = None
        self.fused_experts = tensor_names is not None and any(
            n.endswith("mlp.experts.gate_up_proj") for n in self.tensor_names)

    def is_moe_layer(self, index: int) -> bool:
        return (self.n_routed_experts > 0 and index >= self.first_k_dense_replace
                and index % self.moe_layer_freq == 0)

    def is_skipped(self, name: str) -> bool:
        match = _LAYER_INDEX.match(name)
        return match is not None and int(match.group(1)) >= self.num_layers

    def is_buffer(self, name: str) -> bool:
        return name.endswith("mlp.gate.e_score_correction_bias")

    # ---- description ----------------------------------------------------------------------------------
    def layer_spec(self, index: int) -> LayerSpec:
        p = f"model.layers.{index}."
        h, heads = self.hidden_size, self.num_heads
        spec = LayerSpec(index)
        lin = spec.linears
        if self.q_lora_rank:
            lin.append(LinearSpec(p + "self_attn.q_a_proj.weight", "attn_q_a", index, (self.q_lora_rank, h)))
            lin.append(LinearSpec(p + "self_attn.q_b_proj.weight", "attn_q_b", index,
                                  (heads * self.qk_head_dim, self.q_lora_rank)))
            spec.others[p + "self_attn.q_a_layernorm.weight"] = (self.q_lora_rank,)
        else:
            lin.append(LinearSpec(p + "self_attn.q_proj.weight", "attn_q", index, (heads * self.qk_head_dim, h)))
        lin.append(LinearSpec(p + "self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa", index,
                              (self.kv_lora_rank + self.qk_rope_head_dim, h)))
        lin.append(LinearSpec(p + "self_attn.kv_b_proj.weight", "attn_kv_b", index,
                              (heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank)))
        lin.append(LinearSpec(p + "self_attn.o_proj.weight", "attn_output", index, (h, heads * self.v_head_dim)))
        spec.others[p + "self_attn.kv_a_layernorm.weight"] = (self.kv_lora_rank,)
        spec.others[p + "input_layernorm.weight"] = (h,)
        spec.others[p + "post_attention_layernorm.weight"] = (h,)

        if not self.is_moe_layer(index):
            inter = self.intermediate_size
            lin += [LinearSpec(p + "mlp.gate_proj.weight", "ffn_gate", index, (inter, h)),
                    LinearSpec(p + "mlp.up_proj.weight", "ffn_up", index, (inter, h)),
                    LinearSpec(p + "mlp.down_proj.weight", "ffn_down", index, (h, inter))]
            return spec

        n_exp, inter = self.n_routed_experts, self.moe_intermediate_size
        spec.routed_experts, spec.experts_per_token = n_exp, self.experts_per_token
        spec.others[p + "mlp.gate.weight"] = (n_exp, h)
        spec.others[p + "mlp.gate.e_score_correction_bias"] = (n_exp,)
        if self.fused_experts:
            lin += [LinearSpec(p + "mlp.experts.gate_up_proj", "ffn_gate_up_exps", index, (n_exp, 2 * inter, h)),
                    LinearSpec(p + "mlp.experts.down_proj", "ffn_down_exps", index, (n_exp, h, inter))]
        else:
            for e in range(n_exp):
                q = f"{p}mlp.experts.{e}."
                lin += [LinearSpec(q + "gate_proj.weight", "ffn_gate_exps", index, (inter, h), e),
                        LinearSpec(q + "up_proj.weight", "ffn_up_exps", index, (inter, h), e),
                        LinearSpec(q + "down_proj.weight", "ffn_down_exps", index, (h, inter), e)]
        if self.n_shared_experts:
            shared = inter * self.n_shared_experts
            q = p + "mlp.shared_experts."
            lin += [LinearSpec(q + "gate_proj.weight", "ffn_gate_shexp", index, (shared, h)),
                    LinearSpec(q + "up_proj.weight", "ffn_up_shexp", index, (shared, h)),
                    LinearSpec(q + "down_proj.weight", "ffn_down_shexp", index, (h, shared))]
        return spec

    # ---- forward ----------------------------------------------------------------------------------------
    def layer_forward(self, index: int, weights: Weights, hidden: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        x = rms_norm(hidden, weights(p + "input_layernorm.weight"), self.rms_norm_eps)
        hidden = hidden + self._attention(p, weights, x, positions)
        x = rms_norm(hidden, weights(p + "post_attention_layernorm.weight"), self.rms_norm_eps)
        if self.is_moe_layer(index):
            return hidden + self._moe(index, weights, x)
        return hidden + swiglu(x, weights(p + "mlp.gate_proj.weight"), weights(p + "mlp.up_proj.weight"),
                               weights(p + "mlp.down_proj.weight"))

    def _attention(self, p: str, weights: Weights, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = p + "self_attn."
        if self.q_lora_rank:
            q_latent = rms_norm(x @ weights(a + "q_a_proj.weight").T, weights(a + "q_a_layernorm.weight"),
                                self.rms_norm_eps)
            q = q_latent @ weights(a + "q_b_proj.weight").T
        else:
            q = x @ weights(a + "q_proj.weight").T
        q = q.view(b, t, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed = x @ weights(a + "kv_a_proj_with_mqa.weight").T
        kv_latent, k_rot = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_latent = rms_norm(kv_latent, weights(a + "kv_a_layernorm.weight"), self.rms_norm_eps)
        k_rot = k_rot.view(b, 1, t, self.qk_rope_head_dim)

        cos, sin = self.rope.cos_sin(positions)
        rotate = Rope.apply_interleaved if self.rope_interleave else Rope.apply
        q_rot, k_rot = rotate(q_rot, cos, sin), rotate(k_rot, cos, sin)

        kv = (kv_latent @ weights(a + "kv_b_proj.weight").T).view(b, t, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        attn = causal_attention(q, k, v, self.softmax_scale)
        return attn @ weights(a + "o_proj.weight").T

    def route(self, router_weight: torch.Tensor, correction_bias: torch.Tensor,
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert indices [tokens, k] and their weights [tokens, k] for tokens x [tokens, hidden]."""
        scores = (x.float() @ router_weight.float().T).sigmoid()
        choice = scores + correction_bias
        if self.n_group > 1:
            tokens = x.shape[0]
            grouped = choice.view(tokens, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False)[1], True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, -1)
        indices = choice.topk(self.experts_per_token, dim=-1, sorted=False)[1]
        gates = scores.gather(1, indices)
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, gates * self.routed_scaling_factor

    def _moe(self, index: int, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        indices, gates = self.route(weights(p + "mlp.gate.weight"), weights(p + "mlp.gate.e_score_correction_bias"),
                                    tokens)
        if self.on_route is not None:
            self.on_route(index, indices)
        out = torch.zeros_like(tokens)
        fused = ((weights(p + "mlp.experts.gate_up_proj"), weights(p + "mlp.experts.down_proj"))
                 if self.fused_experts else None)
        for e in indices.unique().tolist():
            token_idx, slot = torch.where(indices == e)
            xe = tokens[token_idx]
            if fused:
                gate, up = F.linear(xe, fused[0][e]).chunk(2, dim=-1)
                ye = F.linear(F.silu(gate) * up, fused[1][e])
            else:
                q = f"{p}mlp.experts.{e}."
                ye = swiglu(xe, weights(q + "gate_proj.weight"), weights(q + "up_proj.weight"),
                            weights(q + "down_proj.weight"))
            out.index_add_(0, token_idx, ye * gates[token_idx, slot, None])
        if self.n_shared_experts:
            q = p + "mlp.shared_experts."
            out = out + swiglu(tokens, weights(q + "gate_proj.weight"), weights(q + "up_proj.weight"),
                               weights(q + "down_proj.weight"))
        return out.view(shape)
