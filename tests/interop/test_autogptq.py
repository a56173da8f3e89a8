"""AutoGPTQ 0.7.1's own loader (AutoGPTQForCausalLM.from_quantized, torch QuantLinear on the CPU) on the GPTQ folders
`quantkit convert --to gptq:...` writes, as they are (sharded model-0000k-of-0000n.safetensors with
model.safetensors.index.json: AutoGPTQ finds `model_file_base_name` + ".safetensors.index.json"), compared with
quantkit's forward on the same dequantized weights. Runs in its own venv (conftest.autogptq_env), which is only
there where it was built beforehand: tests/interop/autogptq_check.py builds it, runs this file and records the
result in bench/results/autogptq_load.md.

llama and qwen2 are in AutoGPTQ's model registry; DeepSeek-V3 is not (and transformers 4.43 does not know it):
tiny-deepseek must fail to load, with that reason.
"""

import json

import pytest
import torch
from test_gptq_consumers import SCHEMES, _relative_error, _write

pytestmark = pytest.mark.interop

# max |dlogit| / max |logit| over the windows, as in test_gptq_consumers: AutoGPTQ's torch QuantLinear dequantizes
# the same codes, fp16 scales and zeros and multiplies in float32.
TOLERANCE = 1e-3


def _autogptq(run, folders: dict, windows, tmp) -> dict[str, dict]:
    (tmp / "windows.json").write_text(json.dumps(windows))
    args = []
    for scheme, folder in folders.items():
        args += [folder, tmp / f"autogptq-{scheme}.pt"]
    run("autogptq_logits.py", tmp / "windows.json", *args)
    return {scheme: torch.load(tmp / f"autogptq-{scheme}.pt") for scheme in folders}


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_autogptq_logits_match_quantkit(name, autogptq_env, tmp_path, record_property):
    folders, windows, ours = _write(name, tmp_path, SCHEMES)
    theirs = _autogptq(autogptq_env, folders, windows, tmp_path)
    failures = []
    for scheme in SCHEMES:
        result = theirs[scheme]
        assert "error" not in result, f"{name} {scheme}: AutoGPTQ did not load it: {result.get('error')}"
        delta, relative = _relative_error(result["logits"], ours[scheme])
        record_property(f"{name}:{scheme}", {"max_abs_dlogit": delta, "relative": relative,
                                             "kernels": result["kernels"], "versions": result["versions"]})
        print(f"{name} gptq:{scheme}: max |dlogit| {delta:.3e} (relative {relative:.2e}), kernels "
              f"{result['kernels']}, {result['versions']}")
        if not result["kernels"]:
            failures.append(f"{scheme}: no quantized linear in the loaded model")
        if relative > TOLERANCE:
            failures.append(f"{scheme}: max |dlogit| {delta:.3e} = {relative:.2e} of max |logit| > {TOLERANCE}")
    assert not failures, failures


def test_deepseek_is_not_supported(autogptq_env, tmp_path, record_property):
    folders, windows, _ = _write("tiny-deepseek", tmp_path, ["w4g128"])
    result = _autogptq(autogptq_env, folders, windows, tmp_path)["w4g128"]
    record_property("tiny-deepseek:w4g128", {"error": result.get("error"), "versions": result["versions"]})
    print(f"tiny-deepseek gptq:w4g128 in AutoGPTQ: {result.get('error')}, {result['versions']}")
    # When AutoGPTQ loads it, compare its logits as for the dense models.
    assert "deepseek_v3" in result.get("error", ""), result.get("error") or "AutoGPTQ loaded tiny-deepseek"
