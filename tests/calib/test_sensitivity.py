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


@pytest.mark.parametrize("preset", ["llama", "qwen2-tied", "deepseek_v3"])
def test_costs_equal_whole_model_kld(model_cache, preset):
    model = Model(model_cache(preset, fp8=preset == "deepseek_v3"))
    groups = _groups(model)
    degrade = _degrade(model, groups)
    samples = [torch.randint(3, model.arch.vocab_size, (24,), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
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


def test_killed_measurement_resumes_with_identical_costs(model_cache, tmp_path):
    model = Model(model_cache("llama"))
    groups = _groups(model)
    degrade = _degrade(model, groups)
    samples = [torch.arange(3, 19), torch.arange(5, 21)]
    listed = [g for g, _ in groups.values()]
    whole = measure_sensitivity(model, "test", samples, listed, degrade, path=tmp_path / "whole.json")

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
        measure_sensitivity(model, "test", samples, listed, dying, path=path)
    assert not path.exists() and path.with_name("resumed.json.part").exists()
    calls.clear()

    def counting(group, scheme):
        calls.append((group.name, scheme))
        return degrade(group, scheme)

    resumed = measure_sensitivity(model, "test", samples, listed, counting, path=path)
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
