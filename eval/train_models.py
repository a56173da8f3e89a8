"""Train the bundled models from nothing: tokenizer, then tiny-qwen2, tiny-llama and tiny-deepseek.

    python -m eval.train_models [--models tiny-qwen2,tiny-llama,tiny-deepseek] [--steps N] [--batch B]
                                [--device cpu|cuda] [--tokenizer DIR] [--out DIR]

Fixed seeds; transformers' model classes (the models' real consumer), float32 master weights with bfloat16
autocast (on CPU: 2 threads, 1.4x the float32 step rate on AVX512-BF16 cores, so more tokens fit the ~20
minutes per model). The text is the standard-library train split (quantkit.bundled.textsets).
`--tokenizer DIR` reuses the tokenizer of an existing model folder (all bundled models share one) instead of
training it again, e.g. to retrain one model on a GPU machine whose Python differs.

The models exist to make quantization error measurable, so the recipe leans the way that makes a small
model sensitive to it: the learning rate anneals to zero (the decay phase is where post-training
quantization error grows) and there is no weight decay (decay makes weights more quantization-robust).

Output folders are complete HF checkpoints: BF16 for qwen2/llama; tiny-deepseek in DeepSeek's FP8 layout
(F8_E4M3 + 128x128 weight_scale_inv, per-expert tensors), which is its reference as the official V3/R1
weights are.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from quantkit.bundled import textsets
from quantkit.testing.factory import quantize_block_fp8, write_sharded
from quantkit.testing.tokenizer import EOS, save_tokenizer, train_bpe

BUNDLED = Path(__file__).resolve().parent.parent / "quantkit" / "bundled" / "models"
VOCAB_SIZE = 3072
CONTEXT = 256

_COMMON = {"vocab_size": VOCAB_SIZE, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "initializer_range": 0.02, "hidden_act": "silu",
           "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "use_cache": True, "torch_dtype": "bfloat16"}

CONFIGS = {
    # like R1-Distill-Qwen: q/k/v biases, GQA, tied embeddings (as the small Qwen2 models)
    "tiny-qwen2": {**_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "intermediate_size": 768, "num_key_value_heads": 2, "rope_theta": 1000000.0,
                   "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
                   "max_window_layers": 4},
    # like R1-Distill-Llama: GQA, llama3 rope scaling
    "tiny-llama": {**_COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "intermediate_size": 512, "num_key_value_heads": 2, "rope_theta": 500000.0,
                   "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
                   "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    # like V3/R1: MLA, leading dense layers, 8 routed experts top-2 in 4 groups, a shared expert,
    # sigmoid routing with correction bias, YaRN
    "tiny-deepseek": {**_COMMON, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                      "intermediate_size": 512, "moe_intermediate_size": 256, "num_key_value_heads": 4,
                      "q_lora_rank": 256, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
                      "v_head_dim": 64, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
                      "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                      "scoring_func": "sigmoid", "topk_method": "noaux_tc", "first_k_dense_replace": 2,
                      "moe_layer_freq": 1, "num_nextn_predict_layers": 0, "rope_theta": 10000.0,
                      "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                      "attention_bias": False, "tie_word_embeddings": False,
                      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                              "weight_block_size": [128, 128]}},
}


@dataclass(frozen=True)
class Recipe:
    steps: int
    batch: int  # sequences of CONTEXT tokens per step
    device: str


# qwen2 and llama: ~20 minutes each on 2 CPU cores. tiny-deepseek only reaches the quality bar (4-bit visibly
# costs perplexity) with ~5x their tokens; its transformers step is also 1.5x theirs, so it was trained on an
# H100 (86 s; 1100 steps of 16 on CPU left it at 2x the dense models' perplexity).
RECIPES = {"tiny-qwen2": Recipe(1700, 16, "cpu"), "tiny-llama": Recipe(1800, 16, "cpu"),
           "tiny-deepseek": Recipe(1500, 64, "cuda")}
BIAS_UPDATE_RATE = 1e-3  # DeepSeek-V3's aux-loss-free balancing step (gamma in the V3 report)


def train_tokenizer(folder: Path):
    tokenizer = train_bpe(textsets.documents("train"), VOCAB_SIZE)
    save_tokenizer(tokenizer, folder, model_max_length=2048)
    return tokenizer


def token_stream(tokenizer, split: str) -> torch.Tensor:
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for doc in textsets.documents(split):
        ids += tokenizer.encode(doc).ids + [eos]
    return torch.tensor(ids)


def hf_model(name: str):
    import transformers

    config = dict(CONFIGS[name])
    config.pop("quantization_config", None)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


def train(name: str, tokens: torch.Tensor, recipe: Recipe, log) -> torch.nn.Module:
    steps, batch_size, device = recipe.steps, recipe.batch, recipe.device
    model = hf_model(name).to(device)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = 100

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to zero
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step + 1, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lr_factor)
    routers = _router_counters(model)
    gen = torch.Generator().manual_seed(1234)
    start = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(tokens) - CONTEXT, (batch_size,), generator=gen)
        batch = torch.stack([tokens[s:s + CONTEXT] for s in starts.tolist()]).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss  # transformers shifts the labels
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        _balance_experts(routers)
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.3f} lr {schedule.get_last_lr()[0]:.2e} "
                f"{time.time() - start:.0f}s")
    model.eval()
    return model


def _router_counters(model) -> list:
    """DeepSeek routers with a running per-expert token count, filled by a forward hook."""
    routers = []
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.expert_load = torch.zeros_like(module.e_score_correction_bias)

            def hook(mod, _inputs, outputs):
                mod.expert_load += torch.bincount(outputs[2].flatten(), minlength=mod.expert_load.numel())

            module.register_forward_hook(hook)
            routers.append(module)
    return routers


@torch.no_grad()
def _balance_experts(routers) -> None:
    """Aux-loss-free load balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
    for router in routers:
        load = router.expert_load
        router.e_score_correction_bias += BIAS_UPDATE_RATE * torch.sign(load.mean() - load)
        load.zero_()


def export(name: str, model, folder: Path) -> None:
    """Write the checkpoint as the real model family ships it (names, dtypes, per-expert tensors, FP8)."""
    config = CONFIGS[name]
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H] -> DeepSeek's per-expert gate/up
            prefix = key[: -len("gate_up_proj")]
            for e, fused in enumerate(value):
                gate, up = fused.chunk(2, dim=0)
                tensors[f"{prefix}{e}.gate_proj.weight"] = gate
                tensors[f"{prefix}{e}.up_proj.weight"] = up
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e, down in enumerate(value):
                tensors[f"{prefix}{e}.down_proj.weight"] = down
        else:
            tensors[key] = value
    fp8 = "quantization_config" in config
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith("e_score_correction_bias"):
            out[key] = value.float()
        elif fp8 and value.dim() == 2 and key.startswith("model.layers.") and "mlp.gate.weight" not in key:
            out[key], out[key + "_scale_inv"] = quantize_block_fp8(value)
        else:
            out[key] = value.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    write_sharded(folder, out, shards=2)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=None, help="override the model's recipe (RECIPES)")
    parser.add_argument("--batch", type=int, default=None, help="override: sequences of 256 tokens per step")
    parser.add_argument("--device", default=None, help="override: cpu or cuda")
    parser.add_argument("--tokenizer", type=Path, default=None, help="reuse this folder's tokenizer")
    parser.add_argument("--out", type=Path, default=BUNDLED)
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "training.log", "a")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    if args.tokenizer:
        tokenizer_dir = args.tokenizer
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    else:
        tokenizer_dir = args.out / "_tokenizer"
        tokenizer = train_tokenizer(tokenizer_dir)
    tokens = token_stream(tokenizer, "train")
    log(f"python {textsets.python_version()}: train split {len(tokens)} tokens, vocab {tokenizer.get_vocab_size()}")
    for name in args.models.split(","):
        recipe = RECIPES[name]
        recipe = Recipe(args.steps or recipe.steps, args.batch or recipe.batch, args.device or recipe.device)
        if recipe.device == "cuda" and not torch.cuda.is_available():
            log(f"{name}: its recipe trains on a GPU and none is present; training on the CPU instead (about "
                f"{recipe.steps * recipe.batch // 16 // 60} minutes on 2 cores)")
            recipe = Recipe(recipe.steps, recipe.batch, "cpu")
        log(f"{name}: {recipe}")
        model = train(name, tokens, recipe, log)
        export(name, model, args.out / name)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (args.out / name / file).write_bytes((tokenizer_dir / file).read_bytes())
        log(f"{name}: written to {args.out / name}")


if __name__ == "__main__":
    main()
