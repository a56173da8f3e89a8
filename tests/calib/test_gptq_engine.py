"""GPTQ on the calibration engine: every linear of every layer quantized, better than round-to-nearest at the
model's output, MoE experts calibrated on their routed tokens with a fallback for unused ones, weights read
once per layer, and a resumed run equal to an uninterrupted one."""

from collections import Counter, defaultdict

import pytest
import torch

from quantkit.bundled import model_path
from quantkit.calib import gptq as gptq_engine
from quantkit.calib.data import calibration_samples, scoring_samples
from quantkit.calib.engine import LayerWeights
from quantkit.calib.gptq import (
    GPTQ,
    CalibrationHessians,
    FloatLayerHessians,
    HessianLayers,
    input_hessian,
    runtime_weight,
)
from quantkit.calib.layerwise import LayerStats, Stream, run_layers
from quantkit.errors import ConfigError
from quantkit.model import Model
from quantkit.quant.gptq import GPTQConfig, rtn_quantize

CONFIG = GPTQConfig(bits=4, group_size=32)


def _run(model, samples, stats=None, start_layer=0, restore=None, **method):
    """{layer: {name: GPTQResult}} of one GPTQ stream."""
    results = defaultdict(dict)
    stream = Stream(GPTQ(CONFIG, **method), lambda layer, name, r: results[layer].__setitem__(name, r),
                    start_layer=start_layer, restore=restore, stats=stats if stats is not None else LayerStats())
    yielded = list(run_layers(model, [stream], samples))
    assert yielded == list(range(model.arch.num_layers))
    return dict(results)


def _kld(model, replaced, ids):
    weights = model.weights()
    ref = torch.log_softmax(model.arch.forward(weights, ids), -1)
    out = torch.log_softmax(model.arch.forward(lambda n: replaced.get(n, weights(n)) if n in replaced
                                               else weights(n), ids), -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_every_linear_quantized_and_better_than_rtn():
    with Model(model_path("tiny-llama")) as model:
        samples = calibration_samples(model, None, 8, 128)
        layers = _run(model, samples)
        assert sorted(layers) == list(range(model.arch.num_layers))
        for layer, results in layers.items():
            assert set(results) == {lin.name for lin in model.arch.layer_spec(layer).linears}
        gptq = {n: runtime_weight(r) for results in layers.values() for n, r in results.items()}
        rtn = {n: runtime_weight(rtn_quantize(model.source.read(n), CONFIG)) for n in gptq}
        held_out = calibration_samples(model, None, 10, 128)[8:]  # text after the calibration samples
        ids = torch.stack(held_out)
        kld_gptq, kld_rtn = _kld(model, gptq, ids), _kld(model, rtn, ids)
        assert kld_gptq < 0.8 * kld_rtn, (kld_gptq, kld_rtn)


def test_weights_are_read_once_per_layer(model_cache):
    with Model(model_cache("llama")) as model:
        reads = Counter()
        read = model.source.read

        def counting(name, *args, **kwargs):
            reads[name] += 1
            return read(name, *args, **kwargs)

        model.source.read = counting
        samples = [torch.randint(3, 500, (32,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
        _run(model, samples)
        assert max(reads.values()) == 1, [n for n, c in reads.items() if c > 1]


def test_moe_experts_routed_tokens_and_fallback_for_an_unused_expert(unrouted_expert_model):
    folder = unrouted_expert_model
    with Model(folder) as model:
        stats = LayerStats()
        samples = [torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        layers = _run(model, samples, stats=stats)
        moe = [i for i in range(model.arch.num_layers) if model.arch.is_moe_layer(i)]
        assert sorted(stats.expert_tokens) == moe
        assert stats.expert_tokens[1][3] == 0
        assert "model.layers.1.mlp.experts.3" in stats.fallbacks[1]
        assert stats.layer_record(1)["fallback_experts"] == stats.fallbacks[1]
        for layer in moe:
            assert {lin.name for lin in model.arch.layer_spec(layer).linears} == set(layers[layer])
        rtn_stats = LayerStats()
        rtn_layers = _run(model, samples, stats=rtn_stats, fallback="rtn")
        down = "model.layers.1.mlp.experts.3.down_proj.weight"
        assert torch.equal(rtn_layers[1][down].q, rtn_quantize(model.source.read(down), CONFIG).q)


class _Recording(HessianLayers):
    """Records the Hessian each linear is quantized from (float propagation: every layer sees float inputs)."""

    def __init__(self, **kwargs):
        super().__init__(propagate="float", **kwargs)
        self.hessians = {}

    def quantize(self, job, name, w, acc):
        self.hessians[name] = None if acc is None else acc.H / acc.H.trace()


@pytest.mark.parametrize("fallback", ["all", "rtn"])
def test_float_layer_hessians_are_those_the_pass_quantizes_with(unrouted_expert_model, fallback):
    """What the GPTQ-aware sensitivity measurement encodes each linear with (FloatLayerHessians, one batched
    forward of the layer's float inputs) is what HessianLayers gives it, experts and their fallback included."""
    with Model(unrouted_expert_model) as model:
        samples = [torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        recording = _Recording(fallback=fallback)
        list(run_layers(model, [Stream(recording, lambda *_: None)], samples))
        arch, weights = model.arch, model.weights()
        hidden = arch.embed(weights, torch.stack(samples))
        positions = torch.arange(hidden.shape[1])
        seen = set()
        for index in range(arch.num_layers):
            layer = LayerWeights(weights)
            hessians = FloatLayerHessians(arch, index, layer, [hidden], fallback=fallback)
            for lin in arch.layer_spec(index).linears:
                if lin.name not in recording.hessians:
                    assert lin.name not in hessians, lin.name  # the router: left unquantized by both
                    continue
                seen.add(lin.name)
                expected, acc = recording.hessians[lin.name], hessians[lin.name]
                if expected is None:
                    assert acc is None, lin.name
                else:
                    torch.testing.assert_close(acc.H / acc.H.trace(), expected, rtol=1e-4, atol=1e-7, msg=lin.name)
            hidden = arch.layer_forward(index, layer, hidden, positions)
        assert seen == set(recording.hessians)
        assert (fallback == "rtn") == (recording.hessians["model.layers.1.mlp.experts.3.down_proj.weight"] is None)


@pytest.mark.parametrize("gated", [True, False])
def test_an_expert_s_hessian_counts_each_routed_token_by_its_gate_squared(model_cache, monkeypatch, gated):
    """An expert's share of the MoE output is its output times its gate, so its Hessians weigh each routed token's
    inputs by that gate (gate/up: the layer's router inputs; down: its SwiGLU activations on them), unless too few
    effective tokens are left (here forced either way; the rule itself: test_gate_weighting_needs_enough_tokens)."""
    monkeypatch.setattr(gptq_engine, "MIN_GATED_TOKENS_PER_COLUMN", 0 if gated else 10**9)
    with Model(model_cache("deepseek_v3")) as model:
        arch, weights = model.arch, model.weights()
        moe = next(i for i in range(arch.num_layers)
                   if any(group.expert is not None for group in arch.layer_spec(i).input_groups))
        ids = torch.stack([torch.randint(3, 500, (64,), generator=torch.Generator().manual_seed(i)) for i in range(2)])
        hidden = arch.embed(weights, ids)
        positions = torch.arange(hidden.shape[1])
        for index in range(moe):
            hidden = arch.layer_forward(index, LayerWeights(weights), hidden, positions)
        router_inputs = []
        arch.observe = lambda key, x, i, count: router_inputs.append(x) if key.endswith("mlp.gate") else None
        try:
            arch.layer_forward(moe, LayerWeights(weights), hidden, positions)
        finally:
            arch.observe = None
        hessians = FloatLayerHessians(arch, moe, LayerWeights(weights), [hidden])
        p = f"model.layers.{moe}.mlp."
        x = torch.cat(router_inputs)
        indices, gates = arch.route(weights(p + "gate.weight"), weights(p + "gate.e_score_correction_bias"), x)
        expert = int(indices.flatten().mode().values)
        chosen = indices == expert
        mine = chosen.any(-1)
        xe, ge = x[mine], (gates * chosen).sum(-1)[mine]
        assert ge.std() > 0.1 * ge.mean()  # else weighting could not show

        def normalized(rows):
            h = rows.T @ rows
            return h / h.trace()

        q = f"{p}experts.{expert}."
        gate, up = weights(q + "gate_proj.weight").float(), weights(q + "up_proj.weight").float()
        activations = torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)
        for name, rows in ((q + "gate_proj.weight", xe), (q + "up_proj.weight", xe),
                           (q + "down_proj.weight", activations)):
            acc = hessians[name]
            expected, other = normalized(rows * ge[:, None]), normalized(rows)
            if not gated:
                expected, other = other, expected
            torch.testing.assert_close(acc.H / acc.H.trace(), expected, rtol=1e-4, atol=1e-6, msg=name)
            assert not torch.allclose(acc.H / acc.H.trace(), other, rtol=1e-3, atol=1e-5), name


def test_gate_weighting_needs_enough_tokens():
    """Gates count where they leave MIN_GATED_TOKENS_PER_COLUMN effective tokens, (sum g²)² / sum g⁴, per input
    column; with fewer every token counts alike."""
    columns, generator = 8, torch.Generator().manual_seed(0)
    needed = gptq_engine.MIN_GATED_TOKENS_PER_COLUMN * columns
    for tokens in (2 * needed, needed + 2):  # gates 1 and 1/4 leave 0.56 of the tokens: enough, then too few
        gates = torch.tensor([1.0, 0.25]).repeat(tokens // 2)
        effective = float((gates ** 2).sum() ** 2 / (gates ** 4).sum())
        rows = torch.randn(tokens, columns, generator=generator)
        expected = input_hessian(rows * gates[:, None] if effective >= needed else rows)
        got = input_hessian(rows, gates)
        torch.testing.assert_close(got.H / got.H.trace(), expected.H / expected.H.trace(), msg=f"{tokens} tokens")
        assert (effective >= needed) == (tokens == 2 * needed)


def test_calibration_hessians_are_the_float_pass_hessians_on_its_samples(unrouted_expert_model):
    """An automatic mix's GPTQ candidates are encoded from CalibrationHessians: each layer's float Hessians on the
    output's calibration samples, one forward per sample as the pass runs them; a fork runs ahead and leaves its
    source where it was; a layer already passed is refused."""
    with Model(unrouted_expert_model) as model:
        samples = [torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
        recording = _Recording()
        list(run_layers(model, [Stream(recording, lambda *_: None)], samples))
        arch, weights = model.arch, model.weights()
        source = CalibrationHessians(arch, weights, samples)
        ahead = source.fork()
        for index in range(arch.num_layers):
            hessians = source.layer(index, LayerWeights(weights))
            for name, expected in recording.hessians.items():
                if name in hessians:
                    acc = hessians[name]
                    torch.testing.assert_close(acc.H / acc.H.trace(), expected, rtol=1e-4, atol=1e-7, msg=name)
        last = arch.num_layers - 1
        early = ahead.layer(last, LayerWeights(weights))  # ran ahead from layer 0, as far as the source went
        assert early.dense
        for name, acc in early.dense.items():
            torch.testing.assert_close(acc.H, hessians[name].H, msg=name)
        with pytest.raises(ValueError, match="past layer 0"):
            source.layer(0, LayerWeights(weights))


def test_resumed_run_equals_an_uninterrupted_one(model_cache):
    with Model(model_cache("deepseek_v3", fp8=True)) as model:
        samples = [torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        full = _run(model, samples)
        finished = {layer: {n: runtime_weight(r) for n, r in full[layer].items()} for layer in full}
        resumed = _run(model, samples, start_layer=2, restore=finished.__getitem__)
        assert sorted(resumed) == [layer for layer in full if layer >= 2]
        for layer, results in resumed.items():
            for name, result in results.items():
                assert torch.equal(result.q, full[layer][name].q) and torch.equal(result.scales,
                                                                                 full[layer][name].scales), name


def test_calibration_text_too_short_says_how_many_tokens(model_cache, tmp_path):
    (tmp_path / "short.txt").write_text("def f():\n    return 1\n")
    with Model(model_cache("llama")) as model:
        with pytest.raises(ConfigError, match=r"need 512"):
            calibration_samples(model, tmp_path / "short.txt", 4, 128)
        (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
        with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
            calibration_samples(model, tmp_path / "bad.jsonl", 1, 8)


def test_gptq_candidates_are_scored_after_the_samples_their_hessians_come_from(model_cache, tmp_path, caplog):
    """An automatic mix's GPTQ costs are scored on the calibration samples after the --calib-samples the Hessians
    (and the output's pass) use: out of sample, as the output's eval on other text is. A text with no room after
    them scores on the first ones and says so; no fitting (round-to-nearest costs): the first ones."""
    with Model(model_cache("llama")) as model:
        after = scoring_samples(model, None, 2, 128, fitted=8)
        assert all(torch.equal(a, b)
                   for a, b in zip(after, calibration_samples(model, None, 10, 128)[8:], strict=True))
        first = calibration_samples(model, None, 2, 128)
        assert all(torch.equal(a, b)
                   for a, b in zip(scoring_samples(model, None, 2, 128, fitted=0), first, strict=True))
        short = tmp_path / "short.txt"
        short.write_text(" ".join(str(i) for i in range(600)))
        with caplog.at_level("WARNING"):
            fallback = scoring_samples(model, short, 1, 128, fitted=200)
        assert torch.equal(fallback[0], calibration_samples(model, short, 1, 128)[0])
        assert "too short to score the measurement" in caplog.text


def test_fused_experts_are_refused(model_cache):
    with Model(model_cache("deepseek_v3", fused_experts=True)) as model:
        with pytest.raises(ConfigError, match="fused"):
            _run(model, [torch.arange(3, 35)])
