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
    InputGroup,
    KVCacheLayout,
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

        params = self.rope_params = rope_parameters(c)
        self.rope = Rope(params, self.qk_rope_head_dim, c.get("max_position_embeddings", 4096))
        self.softmax_scale = self.qk_head_dim ** -0.5
        if params["rope_type"] != "default" and params.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
        # Called as on_route(layer index, expert indices [tokens, k], their gates [tokens, k]) by every MoE layer.
        self.on_route: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
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
        a = p + "self_attn."
        h, heads = self.hidden_size, self.num_heads
        spec = LayerSpec(index)
        lin, groups = spec.linears, spec.input_groups

        def linear(role: str, shape: tuple[int, ...], expert: int | None = None, name: str | None = None) -> str:
            name = name or f"{p}{role}.weight"
            lin.append(LinearSpec(name, role, index, shape, expert))
            return name

        attn_in = p + "input_layernorm.weight"
        kv_a = linear("self_attn.kv_a_proj_with_mqa", (self.kv_lora_rank + self.qk_rope_head_dim, h))
        if self.q_lora_rank:
            q_a = linear("self_attn.q_a_proj", (self.q_lora_rank, h))
            q_b = linear("self_attn.q_b_proj", (heads * self.qk_head_dim, self.q_lora_rank))
            spec.others[a + "q_a_layernorm.weight"] = (self.q_lora_rank,)
            groups += [InputGroup(a + "q_a_proj", (q_a, kv_a), attn_in, "norm"),
                       InputGroup(a + "q_b_proj", (q_b,), a + "q_a_layernorm.weight", "norm")]
        else:
            q = linear("self_attn.q_proj", (heads * self.qk_head_dim, h))
            groups.append(InputGroup(a + "q_proj", (q, kv_a), attn_in, "norm"))
        kv_b = linear("self_attn.kv_b_proj", (heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank))
        o = linear("self_attn.o_proj", (h, heads * self.v_head_dim))
        groups += [InputGroup(a + "kv_b_proj", (kv_b,), a + "kv_a_layernorm.weight", "norm"),
                   InputGroup(a + "o_proj", (o,), p + "self_attn", "attention")]
        spec.others[a + "kv_a_layernorm.weight"] = (self.kv_lora_rank,)
        spec.others[attn_in] = (h,)
        ffn_in = p + "post_attention_layernorm.weight"
        spec.others[ffn_in] = (h,)

        def mlp(stem: str, inter: int, expert: int | None = None) -> None:
            role = "mlp.experts" if expert is not None else stem  # one role for every routed expert's linear
            gate = linear(f"{role}.gate_proj", (inter, h), expert, f"{p}{stem}.gate_proj.weight")
            up = linear(f"{role}.up_proj", (inter, h), expert, f"{p}{stem}.up_proj.weight")
            down = linear(f"{role}.down_proj", (h, inter), expert, f"{p}{stem}.down_proj.weight")
            groups.extend([InputGroup(f"{p}{stem}.gate_proj", (gate, up), ffn_in, "norm", expert),
                           InputGroup(f"{p}{stem}.down_proj", (down,), up, "linear", expert)])

        if not self.is_moe_layer(index):
            mlp("mlp", self.intermediate_size)
            return spec

        n_exp, inter = self.n_routed_experts, self.moe_intermediate_size
        spec.routed_experts, spec.experts_per_token = n_exp, self.experts_per_token
        spec.others[p + "mlp.gate.weight"] = (n_exp, h)
        spec.others[p + "mlp.gate.e_score_correction_bias"] = (n_exp,)
        groups.append(InputGroup(p + "mlp.gate", (p + "mlp.gate.weight",), ffn_in, "norm"))  # the router
        if self.fused_experts:
            gate_up = linear("mlp.experts.gate_up_proj", (n_exp, 2 * inter, h), name=p + "mlp.experts.gate_up_proj")
            down = linear("mlp.experts.down_proj", (n_exp, h, inter), name=p + "mlp.experts.down_proj")
            for e in range(n_exp):
                groups += [InputGroup(f"{p}mlp.experts.{e}.gate_proj", (gate_up,), ffn_in, "norm", e),
                           InputGroup(f"{p}mlp.experts.{e}.down_proj", (down,), gate_up, "linear", e)]
        else:
            for e in range(n_exp):
                mlp(f"mlp.experts.{e}", inter, e)
        if self.n_shared_experts:
            mlp("mlp.shared_experts", inter * self.n_shared_experts)
        return spec

    def kv_cache_layout(self) -> KVCacheLayout:
        # MLA caches the compressed latent and the shared rope key; V is read from the same latent
        latent = (self.kv_lora_rank + self.qk_rope_head_dim,) * self.num_layers
        return KVCacheLayout(latent, (0,) * self.num_layers, latent=True)

    # ---- forward ----------------------------------------------------------------------------------------
    def layer_forward(self, index: int, weights: Weights, hidden: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        x = rms_norm(hidden, weights(p + "input_layernorm.weight"), self.rms_norm_eps)
        hidden = hidden + self._attention(p, weights, x, positions)
        x = rms_norm(hidden, weights(p + "post_attention_layernorm.weight"), self.rms_norm_eps)
        return hidden + self.norm_block(index, p + "post_attention_layernorm.weight", weights, x, positions)

    def norm_block(self, index: int, norm: str, weights: Weights, x: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{index}."
        if norm == p + "input_layernorm.weight":
            return self._attention(p, weights, x, positions)
        if norm == p + "post_attention_layernorm.weight":
            if self.is_moe_layer(index):
                return self._moe(index, weights, x)
            return self._ffn(p + "mlp", x, weights(p + "mlp.gate_proj.weight"), weights(p + "mlp.up_proj.weight"),
                             weights(p + "mlp.down_proj.weight"))
        raise KeyError(f"{norm} feeds no block of layer {index}")

    def _ffn(self, stem: str, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
             down: torch.Tensor) -> torch.Tensor:
        """SwiGLU; reports its two input groups' inputs (keys `stem`.gate_proj / .down_proj) when observed."""
        if self.observe is None:
            return swiglu(x, gate, up, down)
        self._observe(stem + ".gate_proj", x)
        gated = F.silu(x @ gate.T) * (x @ up.T)
        self._observe(stem + ".down_proj", gated)
        return gated @ down.T

    def _attention(self, p: str, weights: Weights, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = p + "self_attn."
        if self.q_lora_rank:
            self._observe(a + "q_a_proj", x)
            q_latent = rms_norm(x @ weights(a + "q_a_proj.weight").T, weights(a + "q_a_layernorm.weight"),
                                self.rms_norm_eps)
            self._observe(a + "q_b_proj", q_latent)
            q = q_latent @ weights(a + "q_b_proj.weight").T
        else:
            self._observe(a + "q_proj", x)
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

        self._observe(a + "kv_b_proj", kv_latent)
        kv = (kv_latent @ weights(a + "kv_b_proj.weight").T).view(b, t, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        attn = causal_attention(q, k, v, self.softmax_scale)
        if self.observe is not None:
            if self.observe_probes:
                self._observe_absorbed(a, q, k, q_nope, kv_latent)
            self._observe(a + "o_proj", attn)
        return attn @ weights(a + "o_proj.weight").T

    def _observe_absorbed(self, a: str, q: torch.Tensor, k: torch.Tensor, q_nope: torch.Tensor,
                          kv_latent: torch.Tensor) -> None:
        """Probes `self_attn.absorbed_k` / `absorbed_v` (per head): MLA run absorbed, as llama.cpp does, feeds
        each head's q_nope through its slice of kv_b's k rows and the attention-weighted latent through its v
        rows; those are the inputs llama.cpp's imatrix records for its split kv_b (attn_k_b / attn_v_b)."""
        heads, t = q.shape[1], q.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self.softmax_scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        latent_out = probs @ kv_latent[:, None]  # [b, heads, t, lora]
        for h in range(heads):
            self._observe(a + "absorbed_k", q_nope[:, h], h, heads)
            self._observe(a + "absorbed_v", latent_out[:, h], h, heads)

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
        self._observe(p + "mlp.gate", tokens)
        indices, gates = self.route(weights(p + "mlp.gate.weight"), weights(p + "mlp.gate.e_score_correction_bias"),
                                    tokens)
        if self.on_route is not None:
            self.on_route(index, indices, gates)
        out = torch.zeros_like(tokens)
        fused = ((weights(p + "mlp.experts.gate_up_proj"), weights(p + "mlp.experts.down_proj"))
                 if self.fused_experts else None)
        for e in indices.unique().tolist():
            token_idx, slot = torch.where(indices == e)
            xe = tokens[token_idx]
            if fused:
                gate, up = fused[0][e].chunk(2, dim=0)
                down = fused[1][e]
            else:
                q = f"{p}mlp.experts.{e}."
                gate, up, down = weights(q + "gate_proj.weight"), weights(q + "up_proj.weight"), weights(
                    q + "down_proj.weight")
            ye = self._ffn(f"{p}mlp.experts.{e}", xe, gate, up, down)
            out.index_add_(0, token_idx, ye * gates[token_idx, slot, None])
        if self.n_shared_experts:
            q = p + "mlp.shared_experts."
            out = out + self._ffn(q[:-1], tokens, weights(q + "gate_proj.weight"),
                                  weights(q + "up_proj.weight"), weights(q + "down_proj.weight"))
        return out.view(shape)
