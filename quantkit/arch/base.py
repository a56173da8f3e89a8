"""What every architecture module provides, and the numerics they share.

An architecture describes its tensors by their checkpoint names, with shapes, from config.json alone; its
layers' structure (input groups: which linears share an input and what produces it; routed experts) and its
KV cache; and runs a reference forward in plain float32 torch one decoder layer at a time, pulling each
layer's weights from a `Weights` callable (a checkpoint, a dequantized GGUF, a calibration layer cache). Only
one layer's weights are alive at a time, so a model larger than RAM still runs. No output format's naming
lives here: each format maps these names itself (quantkit/formats/<format>).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quantkit.errors import ConfigError, SourceError

Weights = Callable[[str], torch.Tensor]  # full tensor name -> float32 tensor on the compute device


@dataclass(frozen=True)
class LinearSpec:
    """A linear weight of a decoder layer, by its checkpoint name."""

    name: str
    role: str  # the module path inside the layer: self_attn.q_proj, mlp.experts.down_proj, ...
    layer: int | None
    shape: tuple[int, ...]
    expert: int | None = None  # routed expert index for per-expert 2-D tensors

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class InputGroup:
    """Linears that read one and the same input, and the op that produces that input.

    `key` names the group in observations (the forward reports the group's input under it). `producer` is the
    tensor whose output the input is: a norm's weight (kind "norm": AWQ-style scales fold into it), a linear's
    weight (kind "linear": they fold into its output rows, e.g. up_proj -> down_proj), or the attention
    (kind "attention": nothing to fold into). `expert` marks a routed expert's group: its input is only the
    tokens routed to it. For fused 3-D expert tensors, `linears` names the fused tensor and `expert` the slice."""

    key: str
    linears: tuple[str, ...]
    producer: str
    kind: str  # "norm" | "linear" | "attention"
    expert: int | None = None


@dataclass(frozen=True)
class KVCacheLayout:
    """What one token costs in the KV cache of every layer, in elements (before the runtime's dtype)."""

    k_per_token: tuple[int, ...]  # per layer
    v_per_token: tuple[int, ...]
    latent: bool = False  # MLA: the cache holds the compressed latent + rope key (V shares K's latent)


@dataclass
class LayerSpec:
    index: int
    linears: list[LinearSpec] = field(default_factory=list)
    others: dict[str, tuple[int, ...]] = field(default_factory=dict)  # norms, biases, router
    input_groups: list[InputGroup] = field(default_factory=list)
    routed_experts: int = 0  # routed experts in this layer (0: dense)
    experts_per_token: int = 0

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {lin.name: lin.shape for lin in self.linears}
        shapes.update(self.others)
        return shapes


class Architecture:
    """Base class; subclasses set `name`, `hf_architectures`, `model_types` and implement the layer parts."""

    name: str = ""
    hf_architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()

    def __init__(self, config: dict, tensor_names: Iterable[str] | None = None):
        self.config = config
        self.tensor_names = set(tensor_names) if tensor_names is not None else None
        self._layer_specs: list[LayerSpec] | None = None
        self.num_layers = self._require("num_hidden_layers")
        self.hidden_size = self._require("hidden_size")
        self.vocab_size = self._require("vocab_size")
        self.rms_norm_eps = float(config.get("rms_norm_eps", 1e-6))
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        # observe(key, x [tokens, in], index, count): calibration's view of the forward. Each layer reports every
        # input group's input under the group's key; with `observe_probes`, also runtime-specific activations
        # (probe keys, per head: index of count), e.g. the inputs of llama.cpp's absorbed MLA matmuls.
        self.observe: Callable[[str, torch.Tensor, int, int], None] | None = None
        self.observe_probes = False

    def _observe(self, key: str, x: torch.Tensor, index: int = 0, count: int = 1) -> None:
        if self.observe is not None:
            self.observe(key, x.reshape(-1, x.shape[-1]), index, count)

    # ---- description ----------------------------------------------------------------------------------
    def layers(self) -> list[LayerSpec]:
        # built once: a 671B MoE's specs (61 layers x 256 experts) take a second, and planners ask many times
        if self._layer_specs is None:
            self._layer_specs = [self.layer_spec(i) for i in range(self.num_layers)]
        return list(self._layer_specs)

    def layer_spec(self, index: int) -> LayerSpec:
        raise NotImplementedError

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
                  "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the model's forward uses, by name (what a complete checkpoint must contain)."""
        shapes = self.global_shapes()
        for layer in self.layers():
            shapes.update(layer.tensor_shapes())
        return shapes

    def kv_cache_layout(self) -> KVCacheLayout:
        raise NotImplementedError

    def layer_weight_names(self, index: int) -> list[str]:
        """Every checkpoint tensor layer `index`'s forward reads."""
        return list(self.layer_spec(index).tensor_shapes())

    def norm_block(self, index: int, norm: str, weights: Weights, x: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """The output (before the residual add) of the block of layer `index` that reads norm `norm`'s output x
        [batch, tokens, hidden]: the attention or the MLP/MoE. AWQ judges a norm's scales by it."""
        raise NotImplementedError

    def is_skipped(self, name: str) -> bool:
        """Tensors in the checkpoint that the model (and conversion) ignores, e.g. MTP layers."""
        return False

    def is_buffer(self, name: str) -> bool:
        """Tensors that are state rather than trained parameters (transformers registers them as buffers)."""
        return False

    def check_tensors(self, available: Iterable[str], where: str) -> None:
        available = set(available)
        missing = [n for n in self.tensor_shapes() if n not in available]
        if missing:
            raise SourceError(f"{where}: {len(missing)} tensor(s) the {self.name} architecture needs are missing, "
                              f"e.g. {missing[0]!r}; the checkpoint is incomplete or does not match config.json")

    # ---- forward ----------------------------------------------------------------------------------------
    def embed(self, weights: Weights, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, weights("model.embed_tokens.weight"))

    def layer_forward(self, index: int, weights: Weights, hidden: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, weights: Weights, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output as the head's matmul sees it."""
        return rms_norm(hidden, weights("model.norm.weight"), self.rms_norm_eps)

    def head(self, weights: Weights, hidden: torch.Tensor) -> torch.Tensor:
        head_name = "model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"
        return self.final_norm(weights, hidden) @ weights(head_name).T

    @torch.no_grad()
    def forward(self, weights: Weights, input_ids: torch.Tensor,
                on_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] in float32; `on_layer(i, hidden)` sees each layer's input."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        hidden = self.embed(weights, input_ids)
        positions = torch.arange(input_ids.shape[1], device=hidden.device)
        for i in range(self.num_layers):
            if on_layer is not None:
                on_layer(i, hidden)
            hidden = self.layer_forward(i, weights, hidden, positions)
        return self.head(weights, hidden)

    # ---- helpers ----------------------------------------------------------------------------------------
    def _require(self, key: str):
        if key not in self.config:
            raise ConfigError(f"config.json has no {key!r}, which the {self.name} architecture needs")
        return self.config[key]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, heads, t, d], k/v [b, kv_heads, t, d]; returns [b, t, heads * dv]."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


# ---- rotary position embeddings ---------------------------------------------------------------------------
def rope_parameters(config: dict) -> dict:
    """The rope settings whether config.json was written by transformers 4 (rope_theta + rope_scaling) or 5
    (rope_parameters); keys normalised to rope_type / rope_theta plus the scaling fields."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def rope_inv_freq(params: dict, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin attention factor, for default, llama3 and yarn rope."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, dim, base, max_position_embeddings)
    raise ConfigError(f"rope type {rope_type!r} is not supported; quantkit supports default, llama3 and yarn")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(params: dict, dim: int, base: float, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class Rope:
    """cos/sin tables for a head dimension, applied in the half-split (llama) or interleaved (DeepSeek) layout."""

    def __init__(self, params: dict, dim: int, max_position_embeddings: int):
        self.inv_freq, self.attention_factor = rope_inv_freq(params, dim, max_position_embeddings)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pairs (x0, x1), (x2, x3), ... rotated; output in half-split order, as transformers returns it."""
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
