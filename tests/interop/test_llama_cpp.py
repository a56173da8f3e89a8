"""llama.cpp (through llama-cpp-python) is the consumer of quantkit's GGUF files: it must load every output,
tokenize text exactly as the HF tokenizer does, and compute the logits quantkit's forward computes on the
dequantized weights."""

import json

import numpy as np
import pytest
import torch

from quantkit import convert as api
from quantkit.arch import load_architecture
from quantkit.bundled import MODEL_NAMES, MODELS_DIR, textsets
from quantkit.evaluation.llama_cpp_guard import open_llama
from quantkit.formats.gguf.tensors import mapping_for
from quantkit.source.gguf_file import GGUFFile

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.interop

# Factory stand-ins with k-quant-friendly shapes, used where the bundled models are not trained yet.
STAND_INS = {"tiny-qwen2": ("qwen2-tied", {}), "tiny-llama": ("llama-rope3", {}),
             "tiny-deepseek": ("deepseek_v3", {"fp8": True})}
WIDE = {"hidden_size": 256, "intermediate_size": 512}
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
         "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]
# max |dlogit| / max |logit| allowed: llama.cpp computes float weights in float32 (F16/BF16 activations
# rounded on the way) and multiplies quantized weights with activations it quantizes itself (Q8_0/Q8_K).
BOUNDS = {"F32": 1e-3, "F16": 2e-3, "BF16": 1e-2}
QUANTIZED_BOUND = 4e-2
CONTEXT = 128


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model(request, tmp_path_factory):
    name = request.param
    if (MODELS_DIR / name / "config.json").is_file():
        return MODELS_DIR / name
    preset, kwargs = STAND_INS[name]
    from quantkit.testing.factory import make_tiny_model

    overrides = {} if preset.startswith("deepseek") else WIDE
    return make_tiny_model(tmp_path_factory.mktemp(name) / name, preset, config_overrides=overrides, **kwargs)


@pytest.fixture(scope="module")
def gguf_files(model, bundled_gguf, tmp_path_factory):
    if model.parent == MODELS_DIR:  # the session's shared files (every type, converted once for all modules)
        return bundled_gguf.many(model.name, TYPES)
    out = tmp_path_factory.mktemp("gguf")
    return {plan.target: path for path, plan in api.convert(model, [f"gguf:{t}" for t in TYPES], out)}


def _llama(path, **kwargs):
    return open_llama(path, n_ctx=CONTEXT, n_batch=CONTEXT, n_threads=2, logits_all=True, verbose=False, **kwargs)


def test_tokenization_matches_hf(model, gguf_files):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = textsets.text("heldout")[:20000]
    ours = hf.encode(text, add_special_tokens=False).ids
    llm = _llama(gguf_files["Q8_0"], vocab_only=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours


@pytest.mark.parametrize("type_name", TYPES)
def test_llama_cpp_logits_match_quantkit_forward(model, gguf_files, type_name):
    assert_logits_match_quantkit_forward(model, gguf_files[type_name], type_name)


def assert_logits_match_quantkit_forward(model, gguf, type_name):
    """llama.cpp's logits of the GGUF file `gguf` (of the model folder `model`, quantized as `type_name`) are
    quantkit's forward on its dequantized weights, within BOUNDS. Also used by test_llama_quantize."""
    config = json.loads((model / "config.json").read_text())
    vocab = config["vocab_size"]
    ids = torch.randint(3, vocab, (CONTEXT,), generator=torch.Generator().manual_seed(1))
    llm = _llama(gguf)
    llm.eval(ids.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:CONTEXT], dtype=np.float32))
    arch = load_architecture(config)
    ours = arch.forward(mapping_for(arch).weights_from_gguf(GGUFFile(gguf).read), ids)[0]
    per_position = (theirs - ours).abs().max(-1).values / ours.abs().max()
    bound = BOUNDS.get(type_name, QUANTIZED_BOUND)
    if config.get("n_routed_experts") and type_name not in BOUNDS:
        # MoE: llama.cpp's activation rounding flips near-tied top-k expert choices for a few tokens, which
        # then differ by far more than rounding; the rest must agree.
        assert torch.quantile(per_position, 0.9) < bound, f"{type_name}: 90% of positions within {bound}"
    else:
        assert per_position.max() < bound, f"{type_name}: max |dlogit| / max |logit| = {per_position.max():.2e}"


def test_llama_cpp_loads_split_shards(model, gguf_files, tmp_path):
    """gguf-split layout: llama.cpp opens the first shard, finds the rest, and computes the unsplit logits.
    Q8_0: the split layout does not depend on the type, and Q8_0 is the cheapest quantized type to write."""
    [(first, _)] = api.convert(model, ["gguf:Q8_0"], tmp_path / "split.gguf", split_max_size="2M")
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert first == shards[0] and len(shards) >= 2
    ids = torch.randint(3, 3000, (CONTEXT,), generator=torch.Generator().manual_seed(2)).tolist()
    logits = []
    for path in (first, gguf_files["Q8_0"]):
        llm = _llama(path)
        llm.eval(ids)
        logits.append(np.array(llm.scores[:CONTEXT], dtype=np.float32))
    assert np.array_equal(logits[0], logits[1])
