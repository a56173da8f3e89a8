"""The bundled trained models, text sets and multiple-choice task (committed files; CI never retrains)."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantkit.bundled import MODEL_NAMES, MODELS_DIR, model_path, textsets
from quantkit.bundled.tasks import next_line_items
from quantkit.model import Model
from quantkit.source import open_checkpoint
from quantkit.testing.tokenizer import QWEN2_PRETOKENIZER_REGEX

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "eval" / "tasks" / "stdlib_nextline.jsonl"
TASK_PYTHON = "3.11.7"  # the interpreter whose stdlib text eval/tasks/stdlib_nextline.jsonl was made from
RESULTS_FILE = ROOT / "eval" / "results" / "bundled_models.json"
RESULTS = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.is_file() else []
TRAINED = [name for name in MODEL_NAMES if (MODELS_DIR / name / "config.json").is_file()]
needs_models = pytest.mark.skipif(len(TRAINED) < len(MODEL_NAMES),
                                  reason="bundled models not trained yet (issue 3): python -m eval.train_models")


def test_text_splits_are_disjoint_and_present():
    splits = [set(modules) for modules in textsets.SPLITS.values()]
    assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1:])
    sizes = {name: len(textsets.text(name)) for name in textsets.SPLITS}
    assert sizes["train"] > 3 * sizes["heldout"] > 3 * sizes["calibration"] > 0


def test_task_file_is_the_generators_output():
    committed = [json.loads(line) for line in TASKS.read_text().splitlines()]
    assert len(committed) >= 200
    assert all(len(item["choices"]) == 4 and 0 <= item["label"] < 4 for item in committed)
    if textsets.python_version() != TASK_PYTHON:
        pytest.skip(f"the task file was made from Python {TASK_PYTHON}'s stdlib text")
    assert next_line_items(len(committed)) == committed
    for item in committed:  # distractors give nothing away by layout or length
        true_line = item["choices"][item["label"]]
        for choice in item["choices"]:
            assert len(choice) - len(choice.lstrip()) == len(true_line) - len(true_line.lstrip())
            assert abs(len(choice) - len(true_line)) <= 0.15 * (len(true_line) - 1) + 1e-9


@needs_models
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bundled_model_shapes_and_size(name):
    folder = model_path(name)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 10 * 2**20
    with Model(folder) as model:
        arch = model.arch
        assert 256 <= arch.hidden_size <= 512 and 4 <= arch.num_layers <= 8
        for layer in arch.layers():
            for lin in layer.linears:
                assert lin.shape[-1] % 256 == 0, f"{lin.name}: input dim {lin.shape[-1]} is not a multiple of 256"
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    split = tokenizer["pre_tokenizer"]["pretokenizers"][0]
    assert split["pattern"]["Regex"] == QWEN2_PRETOKENIZER_REGEX
    readme = (folder / "README.md").read_text()
    assert re.search(r"perplexity", readme, re.I)


@needs_models
def test_deepseek_is_fp8_with_moe_and_read_without_a_bf16_copy():
    folder = model_path("tiny-deepseek")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["first_k_dense_replace"] >= 1 and config["n_routed_experts"] >= 8
    assert config["num_experts_per_tok"] >= 2 and config["n_shared_experts"] >= 1
    with open_checkpoint(folder) as ckpt:
        assert ckpt.is_fp8
        linear = "model.layers.2.mlp.experts.5.down_proj.weight"
        assert ckpt.info(linear).dtype == "F8_E4M3"
        assert ckpt.read(linear).dtype == torch.float32  # dequantized per tensor, on read


@needs_models
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reference_forward_matches_transformers_on_trained_weights(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = model_path(name)
    hf_folder = folder
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:  # transformers' FP8 path needs a GPU: give it the dequantized weights
        hf_folder = tmp_path / name
        hf_folder.mkdir()
        with open_checkpoint(folder) as ckpt:
            save_file({t.name: ckpt.read(t.name) for t in ckpt.tensors()}, str(hf_folder / "model.safetensors"))
        del config["quantization_config"]
        (hf_folder / "config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode(textsets.text("heldout")[:3000])[:200]])
    with Model(folder) as model:
        ours = model.forward(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(ids).logits
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


@needs_models
@pytest.mark.parametrize("result", RESULTS, ids=[r["model"] for r in RESULTS])
def test_recorded_measurements_show_learning_and_quantization_cost(result):
    assert result["ppl"] < result["unigram_ppl"] / 2
    assert result["multiple_choice"]["acc"] > 0.35
    q = result["quantized"]
    assert q["Q4_0 pure"]["delta_ppl_pct"] >= 1.0
    assert q["Q4_0 pure"]["delta_ppl_pct"] > q["Q4_0 pure"]["delta_ppl_pct_2sigma"]
    assert q["Q8_0"]["kld_mean"] < q["Q6_K"]["kld_mean"] < q["Q4_K_M"]["kld_mean"]
    if result["experts"]:
        assert all(min(counts) > 0 for counts in result["experts"].values())
