"""The calibration engine: layer-major, each weight read once per run, observers keyed by input group, layer
hooks replacing a layer's outputs before the next layer, and statistics cached on disk."""

from collections import Counter

import pytest
import torch

from quantkit.calib import collect_imatrix
from quantkit.calib.cache import StatisticsCache
from quantkit.calib.engine import Observer, calibrate
from quantkit.model import Model


def _samples(n=3, ctx=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (ctx,), generator=g) for _ in range(n)]


class _Recorder(Observer):
    def __init__(self):
        self.events = []

    def begin_layer(self, arch, layer):
        self.events.append(("begin", layer))

    def observe(self, layer, key, x, index, count):
        assert key.startswith(f"model.layers.{layer}.")
        self.events.append(("observe", layer, key))

    def end_layer(self, layer):
        self.events.append(("end", layer))


@pytest.mark.parametrize(("preset", "kwargs"), [("llama", {}), ("deepseek_v3", {"fp8": True})])
def test_each_weight_is_read_once_per_run(model_cache, preset, kwargs):
    with Model(model_cache(preset, **kwargs)) as model:
        reads = Counter()

        def counting(name):
            reads[name] += 1
            return model.source.read(name)

        recorder = _Recorder()
        calibrate(model.arch, counting, _samples(), [recorder])
        assert reads and max(reads.values()) == 1, [n for n, c in reads.items() if c > 1]
        layers = [e[1] for e in recorder.events if e[0] == "begin"]
        assert layers == list(range(model.arch.num_layers))  # layer-major: every sample through layer i first


def test_engine_equals_a_whole_forward_per_sample(model_cache):
    with Model(model_cache("deepseek_v3", fp8=True)) as model:
        samples = _samples(2, 24)
        seen_engine, seen_forward = {}, {}

        class Sums(Observer):
            def observe(self, layer, key, x, index, count):
                seen_engine[key] = seen_engine.get(key, 0) + x.double().pow(2).sum()

        calibrate(model.arch, model.weights(), samples, [Sums()])
        model.arch.observe = lambda key, x, index, count: seen_forward.__setitem__(
            key, seen_forward.get(key, 0) + x.double().pow(2).sum())
        for s in samples:
            model.arch.forward(model.weights(), s)
        model.arch.observe = None
        assert seen_engine.keys() == seen_forward.keys()
        assert all(torch.equal(seen_engine[k], seen_forward[k]) for k in seen_engine)


def test_layer_hook_outputs_feed_the_next_layer(model_cache):
    with Model(model_cache("llama")) as model:
        first_inputs = {}

        class FirstInput(Observer):
            def observe(self, layer, key, x, index, count):
                if key.endswith("self_attn.q_proj"):
                    first_inputs.setdefault(layer, []).append(x.clone())

        def zero_layer_0(layer, weights, inputs, outputs):
            return [torch.zeros_like(o) for o in outputs] if layer == 0 else None

        calibrate(model.arch, model.weights(), _samples(2, 16), [FirstInput()], layer_hook=zero_layer_0)
        assert all(torch.count_nonzero(x) == 0 for x in first_inputs[1])  # rms_norm(0) * w = 0
        assert all(torch.count_nonzero(x) > 0 for x in first_inputs[0])


def test_imatrix_statistics_are_cached_on_disk(model_cache, tmp_path, monkeypatch):
    tokens = torch.randint(3, 500, (4 * 32,), generator=torch.Generator().manual_seed(3))
    cache = StatisticsCache(tmp_path / "cache")
    with Model(model_cache("llama")) as model:
        first = collect_imatrix(model, tokens, ctx=32, cache=cache)
        assert len(list((tmp_path / "cache").iterdir())) == 1

        def no_forward(*args, **kwargs):
            raise AssertionError("the model ran again although the statistics were cached")

        monkeypatch.setattr("quantkit.calib.runner.calibrate", no_forward)
        again = collect_imatrix(model, tokens, ctx=32, cache=cache)
        assert again.importances().keys() == first.importances().keys()
        assert all(torch.equal(again.importance(n), first.importance(n)) for n in first.sums)
        with pytest.raises(AssertionError, match="ran again"):  # other tokens: another key
            collect_imatrix(model, tokens.flip(0), ctx=32, cache=cache)
