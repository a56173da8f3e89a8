"""How much accelerator memory a model variant needs at a context length: weights, KV cache and an estimate of
the runtime's compute (activation) buffers.

GGUF files follow llama.cpp's own accounting (the vendored llama.cpp of llama-cpp-python 0.3.36):

* weights: every tensor of the file at its stored size (`ggml_nbytes`), which is what `llama_model_size`
  returns and what the model buffers add up to when llama.cpp allocates them (`load_tensors: ... model
  buffer size` lines; CPU, CUDA, ... without mmap). With mmap on the CPU the `CPU_Mapped` buffer is instead
  the file span of the tensors it maps, and repacked tensors (Q4_0/Q4_K/IQ4_NL into `CPU_REPACK`) are then
  counted twice in the log, once in each buffer. With layers offloaded to a GPU, llama.cpp keeps the input
  embedding (token_embd) in host memory, and a tied output head gets its own copy on the GPU; the estimate
  here is the whole model, as one device holding everything.
* KV cache (llama-context.cpp, llama-model.cpp `create_memory`, llama-kv-cache.cpp): n_ctx is padded up to a
  multiple of 256 (0 means the training context); every layer except the NextN/MTP ones gets a K tensor of
  `head_count_kv * key_length` values per cell, and a V tensor of `head_count_kv * value_length` (the
  largest layer's, since without flash attention V is stored transposed and padded to the widest layer).
  DeepSeek2 with MLA (`key_length_mla` / `value_length_mla` present, the attn_k_b / attn_v_b layout) runs as
  MQA over the compressed latent: one K row of kv_lora_rank + rope dims (`key_length`) per token and layer,
  and no V tensor at all (V is a view of the first kv_lora_rank values of K).
* compute: see `_compute_bytes`: llama.cpp's CPU compute buffer (its graph reservation) modelled phase by phase;
  equal to it for most catalog models and contexts, but not its allocator: where freed tensors leave holes
  moves the peak (bench/results/plan_fullscale.md).

HF checkpoints are counted as a GPU runtime (vLLM, transformers) holds them: weights at their stored dtype
(FP8 weights one byte each plus their float32 block scales, BF16 two bytes), multi-token-prediction layers
left out; a K and a V vector per kv head and layer, or for DeepSeek MLA the compressed latent plus the rope
key per layer (as vLLM caches it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.errors import ConfigError
from quantkit.plan.plan import Plan, PlanEntry

F32 = 4
CTX_PAD = 256  # llama_context: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)
DEFAULT_UBATCH = 512  # llama.cpp's default n_ubatch (and n_batch); the chunk a prefill step processes


UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "ki": 2**10, "mi": 2**20, "gi": 2**30,
         "ti": 2**40}


def parse_bytes(text: str) -> int:
    """24GiB, 24GB, 80G, 141 GB: GiB/MiB are powers of 1024, GB/MB/G/M powers of 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if match is None:
        raise ConfigError(f"cannot read the size {text!r}; write e.g. 24GiB, 24GB or 80G")
    return int(float(match.group(1)) * UNITS[(match.group(2) or "").lower()])


@dataclass(frozen=True)
class VramEstimate:
    weights: int  # bytes of weights as the runtime stores them
    kv_cache: int  # bytes of KV cache at ctx
    compute: int  # bytes, an estimate of the runtime's compute/activation buffers at ctx

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def as_dict(self) -> dict:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute, "total": self.total}


@dataclass(frozen=True)
class _Dims:
    """The widths the compute estimate needs (per token, in values)."""

    n_embd: int
    n_head: int
    attn_width: int  # values per token live beside the attention scores (see _attention_width)
    ffn_width: int  # widest feed-forward intermediate per token (MoE: the experts a token uses, + shared)
    n_vocab: int


def _attention_width(n_embd: int, n_head: int, q_width: int, k_width: int, v_width: int,
                     mla: tuple[int, int, int] | None = None) -> int:
    """Values per token that sit below the attention scores in llama.cpp's compute buffer (without flash
    attention): the residual and normed input, the query before and after rope, the new K and V rows. With MLA
    (`mla` = (qk_head_dim, kv_lora_rank, rope_dim)) the query is absorbed: the q_b projection (qk_head_dim per
    head), its nope part multiplied into the latent (kv_lora_rank per head), the rope part (twice: viewed and
    roped) and the concatenated query (kv_lora_rank + rope per head, `q_width`). Fitted to llama.cpp's
    reservations of the catalog models (tests/plan/test_plan_llama_cpp.py, bench/plan_fullscale.py)."""
    if mla is None:
        return 3 * n_embd + 2 * q_width + k_width + v_width
    qk_head_dim, kv_lora_rank, rope_dim = mla
    return 4 * n_embd + n_head * (qk_head_dim + kv_lora_rank + 2 * rope_dim) + q_width


# ---- GGUF (llama.cpp) ---------------------------------------------------------------------------------------
def llama_cpp_n_ctx(ctx: int, n_ctx_train: int = 0) -> int:
    """The number of KV cells llama.cpp allocates for a requested context (one sequence)."""
    if ctx <= 0:
        ctx = n_ctx_train
    if ctx <= 0:
        raise ConfigError("context length must be positive (or 0 with a model that records its training context)")
    return -(-ctx // CTX_PAD) * CTX_PAD


def kv_type_row_bytes(kv_type: str, n: int) -> int:
    """Bytes of one cache row of `n` values in ggml type `kv_type` (f16, bf16, f32, q8_0, q4_0, ...), or vLLM's
    fp8 (one byte per value)."""
    if kv_type.lower() == "fp8":
        return n
    try:
        qtype = GGMLQuantizationType[kv_type.upper()]
    except KeyError:
        raise ConfigError(f"unknown KV cache type {kv_type!r}; use a ggml type name such as f16, bf16, f32, "
                          "q8_0, q4_0") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n % block:
        raise ConfigError(f"KV cache rows of {n} values cannot be stored as {kv_type} (blocks of {block})")
    return n // block * type_size


def vram_gguf(gguf, ctx: int, kv_type: str = "f16", n_ubatch: int = DEFAULT_UBATCH) -> VramEstimate:
    """Memory llama.cpp needs for a GGUF file (`quantkit.source.gguf_file.GGUFFile`) at context `ctx`, with
    its K and V caches in ggml type `kv_type`, processing `n_ubatch` tokens per step."""
    arch = gguf.metadata("general.architecture")
    if not arch:
        raise ConfigError(f"{gguf.path}: no general.architecture in the GGUF metadata")

    def key(name, default=None):
        value = gguf.metadata(f"{arch}.{name}")
        return default if value is None else value

    n_layer_all = int(key("block_count", 0))
    if n_layer_all <= 0:
        raise ConfigError(f"{gguf.path}: no {arch}.block_count in the GGUF metadata")
    n_layer = n_layer_all - int(key("nextn_predict_layers", 0))  # NextN/MTP layers get no cache in the trunk
    n_embd = int(key("embedding_length", 0))
    n_head = _per_layer(key("attention.head_count", 0), n_layer_all)
    n_head_kv = _per_layer(key("attention.head_count_kv", n_head), n_layer_all)
    head_max = max(n_head)
    k_len = int(key("attention.key_length", n_embd // head_max if head_max else 0))
    v_len = int(key("attention.value_length", n_embd // head_max if head_max else 0))
    is_mla = bool(key("attention.key_length_mla", 0)) and bool(key("attention.value_length_mla", 0))

    n_kv = llama_cpp_n_ctx(ctx, int(key("context_length", 0)))
    layers = range(n_layer)
    k_bytes = sum(kv_type_row_bytes(kv_type, n_head_kv[il] * k_len) for il in layers) * n_kv
    v_bytes = 0
    if not is_mla:
        v_width = max(n_head_kv[il] * v_len for il in range(n_layer_all))  # transposed V: the widest layer's
        v_bytes = len(layers) * kv_type_row_bytes(kv_type, v_width) * n_kv
    weights = sum(t.nbytes for t in gguf.tensors.values())

    n_vocab = key("vocab_size")
    if n_vocab is None:
        tokens = gguf.metadata("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens else gguf.tensors["token_embd.weight"].shape[0]
    n_ff = max(_per_layer(key("feed_forward_length", 0), n_layer_all))
    n_expert_used = int(key("expert_used_count", 0))
    if n_expert_used:
        ff_exp = int(key("expert_feed_forward_length", 0))
        shared_ff = ff_exp * int(key("expert_shared_count", 0))
        n_ff = max(n_ff, n_expert_used * ff_exp + shared_ff + int(key("expert_count", 0)))
    mla = (int(key("attention.key_length_mla")), int(key("attention.kv_lora_rank", v_len)),
           int(key("rope.dimension_count", k_len - v_len))) if is_mla else None
    width = _attention_width(n_embd, head_max, head_max * k_len, max(n_head_kv) * k_len,
                             0 if is_mla else max(n_head_kv) * v_len, mla)
    dims = _Dims(n_embd=n_embd, n_head=head_max, attn_width=width, ffn_width=n_ff, n_vocab=int(n_vocab))
    # llama.cpp caps the batch (and so the ubatch) at the context size for causal models
    compute = _compute_bytes(dims, n_kv, min(n_ubatch, n_kv))
    return VramEstimate(weights=weights, kv_cache=k_bytes + v_bytes, compute=compute)


def _per_layer(value, n_layer: int) -> list[int]:
    """A hyperparameter llama.cpp reads with get_key_or_arr: one value for all layers or one per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise ConfigError(f"per-layer hyperparameter has {len(value)} values for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


# ---- from an architecture and a plan, before anything is written ------------------------------------------
def _arch_dims(arch) -> _Dims:
    layout = arch.kv_cache_layout()
    n_head = getattr(arch, "num_heads", 0)
    k_width, v_width = max(layout.k_per_token), max(layout.v_per_token)
    if layout.latent:  # MLA runs as MQA over the latent: every head's query is latent-wide, V is the latent
        width = _attention_width(arch.hidden_size, n_head, n_head * k_width, k_width, 0,
                                 (arch.qk_head_dim, arch.kv_lora_rank, arch.qk_rope_head_dim))
    else:
        width = _attention_width(arch.hidden_size, n_head, n_head * arch.head_dim, k_width, v_width)
    ffn = getattr(arch, "intermediate_size", 0)
    used = getattr(arch, "experts_per_token", 0) if getattr(arch, "n_routed_experts", 0) else 0
    if used:
        ff_exp = arch.moe_intermediate_size
        ffn = max(ffn, used * ff_exp + ff_exp * arch.n_shared_experts + arch.n_routed_experts)
    return _Dims(n_embd=arch.hidden_size, n_head=n_head, attn_width=width, ffn_width=ffn, n_vocab=arch.vocab_size)


def vram_plan(arch, plan, ctx: int, kv_type: str = "f16", n_ubatch: int = DEFAULT_UBATCH) -> VramEstimate:
    """Memory the plan's runtime needs for `arch` (quantkit.arch.Architecture) stored as `plan`
    (quantkit.plan.Plan) at context `ctx`, with a KV cache in ggml type `kv_type` (f16, bf16, q8_0, ...).

    GGUF plans follow llama.cpp (n_ctx padded to 256, or the training context for 0; V stored per layer at
    the widest layer's width; MLA caches only K, the latent); other plans a GPU runtime holding the KV cache
    at exactly `ctx` positions (vLLM, transformers). Weights are the plan's bytes."""
    layout = arch.kv_cache_layout()
    if plan.format == "gguf":
        n_kv = llama_cpp_n_ctx(ctx, int(arch.config.get("max_position_embeddings", 0)))
        n_ub = min(n_ubatch, n_kv)  # llama.cpp caps the batch (and so the ubatch) at the context size
    elif ctx <= 0:
        raise ConfigError("context length must be positive")
    else:
        n_kv, n_ub = ctx, min(n_ubatch, ctx)
    k_bytes = sum(kv_type_row_bytes(kv_type, k) for k in layout.k_per_token) * n_kv
    v_bytes = 0
    if not layout.latent:
        widest = max(layout.v_per_token) if plan.format == "gguf" else None
        v_bytes = sum(kv_type_row_bytes(kv_type, widest or v) for v in layout.v_per_token) * n_kv
    return VramEstimate(weights=plan.total_bytes, kv_cache=k_bytes + v_bytes,
                        compute=_compute_bytes(_arch_dims(arch), n_kv, n_ub))


def stored_plan(model) -> Plan:
    """An HF checkpoint as it is stored (every tensor at its stored bytes, FP8 block scales included, MTP layers
    left out): what a GPU runtime loads when it serves the checkpoint as is."""
    arch, source = model.arch, model.source
    entries = tuple(PlanEntry(t.name, tuple(t.shape), t.dtype, t.nbytes, False) for t in source.tensors()
                    if not arch.is_skipped(t.name))
    return Plan("hf", "stored", entries)


def vram_checkpoint(model, ctx: int, kv_type: str = "bf16") -> VramEstimate:
    """Memory a GPU runtime (vLLM, transformers) needs for an HF checkpoint (`quantkit.model.Model`) at its
    stored precision, at context `ctx`."""
    return vram_plan(model.arch, stored_plan(model), ctx, kv_type)


# ---- compute buffers ----------------------------------------------------------------------------------------
_SMALL_INPUTS = 5  # i32 values per token of the graph's small inputs live during attention (ids, positions, ...)


def _compute_bytes(d: _Dims, n_kv: int, n_ub: int) -> int:
    """llama.cpp's CPU compute buffer for one step of `n_ub` tokens against `n_kv` cells, without flash attention
    (its graph reservation: every token an output), all in 4-byte values.

    ggml's allocator reuses a tensor's memory once it is dead, so the buffer is the largest of three phases:
    * attention: the scores of every head, n_head x n_kv x n_ub (softmax runs in place), the f32 mask
      n_kv x n_ub, and the tensors of `_Dims.attn_width` below them, plus the small inputs;
    * feed-forward: the residual twice and gate, up and their product;
    * output: the logits of every token and the final hidden state twice, plus the output ids.
    Checked against llama.cpp's reservation for every catalog model at 512 to 32768 cells
    (bench/plan_fullscale.py, bench/results/plan_fullscale.md): equal to its printed figure in most cases. The
    allocator's placement is not modelled (a large tensor goes into a freed hole when it fits, else above
    everything live), which is the remaining difference: the logits placed above a leftover tensor (-10.7% on
    R1-Distill-Qwen-14B at 2048 cells, -1% on R1-Distill-Qwen-1.5B), and DeepSeek's scores fitting the hole the
    absorbed query left at 512 cells (+37%: an overestimate). With flash attention the score term goes away;
    other runtimes (vLLM) size their buffers differently, so for them this is an order of magnitude."""
    attention = n_ub * n_kv * (d.n_head + 1) + n_ub * (d.attn_width + _SMALL_INPUTS)
    feed_forward = n_ub * (2 * d.n_embd + 3 * d.ffn_width)
    output = n_ub * (d.n_vocab + 2 * d.n_embd + 1)
    return F32 * max(attention, feed_forward, output)


__all__ = ["VramEstimate", "parse_bytes", "vram_gguf", "vram_plan", "vram_checkpoint", "stored_plan", "llama_cpp_n_ctx",
           "kv_type_row_bytes"]
