"""The sensitivity measurement's layer-major shortcut must equal the plain definition: the whole model run with
one group's weights degraded, its next-token distributions compared with the float model's."""

import pytest
import torch

from quantkit.calib.sensitivity import EMBEDDING, Group, Sensitivity, measure, measure_sensitivity
from quantkit.errors import ConfigError
from quantkit.model import Model


def _coarse(t: torch.Tensor) -> torch.Tensor:
    return (t * 8).round() / 8  # a crude "quantizer": large, deterministic errors


def _groups(model: Model) -> dict[str, tuple[Group, list[str]]]:
    n = model.arch.num_layers
    head = "model.embed_tokens.weight" if model.arch.tie_word_embeddings else "lm_head.weight"
    attn = [lin.name for lin in model.arch.layer_spec(1).linears if "self_attn" in lin.name]
    layer1 = [lin.name for lin in model.arch.layer_spec(n - 1).linears][-1:]
    return {"embed": (Group("embed", EMBEDDING, ("coarse", "fine"), (1, 2)), ["model.embed_tokens.weight"]),
            "attn1": (Group("attn1", 1, ("coarse", "fine"), (1, 2)), attn),
            "last": (Group("last", n - 1, ("coarse",), (1,)), layer1),
            "head": (Group("head", n, ("coarse",), (1,)), [head])}


def _degrade(model: Model, groups):
    weights = model.weights()

    def degrade(group: Group, scheme: str) -> dict[str, torch.Tensor]:
        step = 8 if scheme == "coarse" else 64
        return {n: (weights(n) * step).round() / step for n in groups[group.name][1]}

    return degrade


def _random_samples(model: Model) -> list[torch.Tensor]:
    return [torch.randint(3, model.arch.vocab_size, (24,), generator=torch.Generator().manual_seed(i))
            for i in range(3)]


@pytest.mark.parametrize("preset", ["llama", "qwen2-tied", "deepseek_v3"])
def test_costs_equal_whole_model_kld(model_cache, preset):
    model = Model(model_cache(preset, fp8=preset == "deepseek_v3"))
    groups = _groups(model)
    degrade = _degrade(model, groups)
    samples = _random_samples(model)
    costs = measure(model.arch, model.weights(), samples, [g for g, _ in groups.values()], degrade,
                    batch_bytes=1)  # one candidate per batch: the batching must not matter either
    weights = model.weights()
    for name, (group, _) in groups.items():
        for scheme in group.schemes:
            replaced = degrade(group, scheme)

            def patched(n, replaced=replaced):
                return replaced.get(n, weights(n)) if n in replaced else weights(n)

            total = 0.0
            for ids in samples:
                p = torch.log_softmax(model.arch.forward(weights, ids)[0], -1)
                q = torch.log_softmax(model.arch.forward(patched, ids)[0], -1)
                total += float((p.exp() * (p - q)).sum(-1).sum())
            expected = total / sum(len(s) for s in samples)
            assert costs[name][scheme] == pytest.approx(expected, rel=1e-3, abs=1e-9), (name, scheme)
    if preset != "qwen2-tied":  # its random tied head makes near one-hot outputs: every cost is ~0 there
        assert 0 < costs["attn1"]["fine"] < costs["attn1"]["coarse"]
    model.close()


def test_stored_measurement_is_reused_only_for_the_same_inputs(model_cache, tmp_path, monkeypatch):
    model = Model(model_cache("llama"))
    groups = _groups(model)
    degrade = _degrade(model, groups)
    samples = [torch.arange(3, 19)]
    path = tmp_path / "s.json"
    first = measure_sensitivity(model, "test", samples, [g for g, _ in groups.values()], degrade, path=path)
    assert Sensitivity.load(path).costs == first.costs

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr("quantkit.calib.sensitivity.measure", fail)
    again = measure_sensitivity(model, "test", samples, [g for g, _ in groups.values()], degrade, path=path)
    assert again.costs == first.costs
    with pytest.raises(AssertionError, match="measured again"):  # other text: another measurement
        measure_sensitivity(model, "test", [torch.arange(4, 20)], [g for g, _ in groups.values()], degrade, path=path)
    with pytest.raises(AssertionError, match="measured again"):  # the same tokens in other windows
        measure_sensitivity(model, "test", [torch.arange(3, 11), torch.arange(11, 19)],
                            [g for g, _ in groups.values()], degrade, path=path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        Sensitivity.load(path)
    model.close()


def test_progress_counts_to_its_total(model_cache):
    model = Model(model_cache("llama"))
    groups = _groups(model)
    seen = []
    measure(model.arch, model.weights(), [torch.arange(3, 19)], [g for g, _ in groups.values()],
            _degrade(model, groups), progress=seen.append)
    assert seen[-1].done == seen[-1].total and all(a.done < b.done for a, b in zip(seen, seen[1:], strict=False))
    model.close()


@pytest.mark.parametrize("anchors", [None, {"embed": "coarse", "attn1": "fine"}], ids=["output", "proxy"])
def test_killed_measurement_resumes_with_identical_costs(model_cache, tmp_path, anchors):
    model = Model(model_cache("llama"))
    groups = _groups(model)
    degrade = _degrade(model, groups)
    samples = [torch.arange(3, 19), torch.arange(5, 21)]
    listed = [g for g, _ in groups.values()]
    whole = measure_sensitivity(model, "test", samples, listed, degrade, path=tmp_path / "whole.json",
                                anchors=anchors)

    class Killed(Exception):
        pass

    calls = []

    def dying(group, scheme):
        if group.name == "last":  # layer 1's stage, after attn1's candidates; the embedding's stage is checkpointed
            raise Killed
        calls.append((group.name, scheme))
        return degrade(group, scheme)

    path = tmp_path / "resumed.json"
    with pytest.raises(Killed):
        measure_sensitivity(model, "test", samples, listed, dying, path=path, anchors=anchors)
    assert not path.exists() and path.with_name("resumed.json.part").exists()
    calls.clear()

    def counting(group, scheme):
        calls.append((group.name, scheme))
        return degrade(group, scheme)

    resumed = measure_sensitivity(model, "test", samples, listed, counting, path=path, anchors=anchors)
    # the embedding's stage is not measured again; layer 1's unfinished stage and the head are
    assert model.arch.num_layers == 2 and groups["attn1"][0].stage == groups["last"][0].stage == 1
    assert sorted(calls) == [("attn1", "coarse"), ("attn1", "fine"), ("head", "coarse"), ("last", "coarse")]
    assert resumed.costs == whole.costs and resumed.key == whole.key
    assert not path.with_name("resumed.json.part").exists()
    model.close()


def test_default_location_is_the_statistics_cache(model_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    model = Model(model_cache("llama"))
    groups = _groups(model)
    result = measure_sensitivity(model, "test", [torch.arange(3, 19)], [g for g, _ in groups.values()],
                                 _degrade(model, groups))
    assert (tmp_path / "calib" / f"test-sensitivity-{result.key}.json").is_file()
    model.close()


def _stage_error(model: Model, group: Group, replaced: dict, ids: torch.Tensor) -> float:
    """The plain definition: the mean squared change of the group's stage output (embedding or decoder layer),
    every earlier layer float."""
    weights = model.weights()

    def patched(n):
        return replaced[n] if n in replaced else weights(n)

    positions = torch.arange(ids.shape[1])
    float_h, h = model.arch.embed(weights, ids), model.arch.embed(patched, ids)
    for index in range(group.stage + 1):
        float_h, h = (model.arch.layer_forward(index, weights, float_h, positions),
                      model.arch.layer_forward(index, patched, float_h, positions))
    return float((h - float_h).pow(2).mean())


@pytest.mark.parametrize("preset", ["llama", "deepseek_v3"])
def test_proxy_method_measures_the_anchor_and_scales_the_rest_by_stage_error(model_cache, preset):
    model = Model(model_cache(preset, fp8=preset == "deepseek_v3"))
    groups = _groups(model)
    degrade = _degrade(model, groups)
    samples = _random_samples(model)
    listed = [g for g, _ in groups.values()]
    anchors = {"embed": "coarse", "attn1": "coarse", "head": "coarse"}
    full = measure(model.arch, model.weights(), samples, listed, degrade)
    seen = []
    proxy = measure(model.arch, model.weights(), samples, listed, degrade, anchors=anchors, progress=seen.append)
    assert seen[-1].done == seen[-1].total
    for name in ("embed", "attn1", "head", "last"):  # anchors, the head and groups without an anchor: measured
        assert proxy[name]["coarse"] == pytest.approx(full[name]["coarse"], rel=1e-6)
    ids = torch.stack(samples)
    for name in ("embed", "attn1"):
        group = groups[name][0]
        ratio = (_stage_error(model, group, degrade(group, "fine"), ids)
                 / _stage_error(model, group, degrade(group, "coarse"), ids))
        assert proxy[name]["fine"] == pytest.approx(full[name]["coarse"] * ratio, rel=1e-4)
        assert proxy[name]["fine"] < proxy[name]["coarse"]
    with pytest.raises(ValueError, match="not one of its schemes"):
        measure(model.arch, model.weights(), samples, listed, degrade, anchors={"attn1": "Q4_K"})
    model.close()


def test_proxy_anchor_that_changes_nothing_is_replaced_by_the_largest_error(model_cache):
    model = Model(model_cache("llama"))
    groups = _groups(model)
    degrade = _degrade(model, groups)
    weights = model.weights()
    group = groups["attn1"][0]

    def exact_fine(g: Group, scheme: str) -> dict[str, torch.Tensor]:
        return {n: weights(n) for n in groups[g.name][1]} if scheme == "fine" else degrade(g, scheme)

    samples = [torch.arange(3, 19)]
    full = measure(model.arch, weights, samples, [group], exact_fine)
    proxy = measure(model.arch, weights, samples, [group], exact_fine, anchors={"attn1": "fine"})
    assert proxy["attn1"]["coarse"] == pytest.approx(full["attn1"]["coarse"], rel=1e-6)
    assert proxy["attn1"]["fine"] == 0.0
    model.close()


def test_proxy_and_output_measurements_are_stored_apart(model_cache, tmp_path):
    model = Model(model_cache("llama"))
    groups = _groups(model)
    listed = [g for g, _ in groups.values()]
    samples = [torch.arange(3, 19)]
    output = measure_sensitivity(model, "test", samples, listed, _degrade(model, groups), path=tmp_path / "s.json")
    proxy = measure_sensitivity(model, "test", samples, listed, _degrade(model, groups), path=tmp_path / "s.json",
                                anchors={"attn1": "coarse"})
    assert (output.method, proxy.method) == ("output", "proxy") and output.key != proxy.key
    assert Sensitivity.load(tmp_path / "s.json").method == "proxy"
    model.close()
