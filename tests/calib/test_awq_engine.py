"""AWQ on the calibration engine: folded scales leave the float model's outputs unchanged on every
architecture, every linear is quantized and the result beats round-to-nearest at the model's output, MoE experts
use their routed tokens with the fallback for unused ones."""

from collections import defaultdict

import pytest
import torch

from quantkit.bundled import model_path
from quantkit.calib.awq import AWQ, scaling_units
from quantkit.calib.data import calibration_samples
from quantkit.calib.engine import CalibrationRun, LayerWeights
from quantkit.calib.layerwise import LayerJob, LayerStats, Stream, run_layers
from quantkit.model import Model
from quantkit.quant.awq import AWQConfig, AWQResult, quantize, runtime_weight

CONFIG = AWQConfig(group_size=32)


def _run(model, samples, config=CONFIG, **method):
    """({layer: {name: AWQResult or float tensor}}, stats) of one AWQ stream."""
    results, stats = defaultdict(dict), LayerStats()
    stream = Stream(AWQ(config, **method), lambda layer, name, r: results[layer].__setitem__(name, r), stats=stats)
    assert list(run_layers(model, [stream], samples)) == list(range(model.arch.num_layers))
    return dict(results), stats


@pytest.mark.parametrize("preset, kwargs", [("llama", {}), ("qwen2", {}), ("deepseek_v3", {"fp8": True})])
def test_folded_scales_keep_the_float_layer(model_cache, preset, kwargs):
    with Model(model_cache(preset, **kwargs)) as model:
        samples = [torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        run = CalibrationRun(model.arch, model.weights(), samples)
        method = AWQ(CONFIG)
        for layer in range(model.arch.num_layers):
            cache = LayerWeights(model.weights())
            job = LayerJob(model, layer, Stream(method, lambda *a: None), cache, in_place=False)
            before, cached = method.observe(job, run)
            changed = method.fold_scales(job, cached)
            units = scaling_units(model.arch.layer_spec(layer).input_groups)
            assert {u.producer for u in units} <= changed
            after = run.forward(job)
            for a, b in zip(after, before, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
            run.advance(before)


def test_every_linear_quantized_and_better_than_rtn():
    with Model(model_path("tiny-llama")) as model:
        samples = calibration_samples(model, None, 8, 128)
        layers, stats = _run(model, samples)
        replaced = {}
        for layer, results in layers.items():
            linears = {lin.name for lin in model.arch.layer_spec(layer).linears}
            assert {n for n, r in results.items() if isinstance(r, AWQResult)} == linears
            for name, r in results.items():
                replaced[name] = runtime_weight(r, CONFIG.group_size) if isinstance(r, AWQResult) else r
            assert stats.notes[layer]["awq_scale_ratio"]
        rtn = {n: runtime_weight(quantize(model.source.read(n), CONFIG), CONFIG.group_size)
               for results in layers.values() for n, r in results.items() if isinstance(r, AWQResult)}
        ids = torch.stack(calibration_samples(model, None, 10, 128)[8:])
        weights = model.weights()
        ref = torch.log_softmax(model.arch.forward(weights, ids), -1)

        def kld(table):
            out = torch.log_softmax(model.arch.forward(lambda n: table[n] if n in table else weights(n), ids), -1)
            return float((ref.exp() * (ref - out)).sum(-1).mean())

        assert kld(replaced) < 0.9 * kld(rtn), (kld(replaced), kld(rtn))


def test_moe_routed_tokens_and_fallback(unrouted_expert_model):
    folder = unrouted_expert_model
    with Model(folder) as model:
        samples = [torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        layers, stats = _run(model, samples)
        assert stats.expert_tokens[1][3] == 0 and "model.layers.1.mlp.experts.3" in stats.fallbacks[1]
        assert "model.layers.1.mlp.gate.weight" in layers[1]  # the router's columns carry the norm's scales
        assert isinstance(layers[1]["model.layers.1.post_attention_layernorm.weight"], torch.Tensor)
