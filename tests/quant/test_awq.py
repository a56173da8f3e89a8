"""quantkit.quant.awq against plain re-statements of AutoAWQ's arithmetic (FORMATS.md §6.4, written here from
the description, row by row and group by group): the zero-point pseudo-quantizer, the duo-scaling grid search and
the clip search."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quant import awq

CONFIG = awq.AWQConfig(group_size=32)


def _reference_pseudo_quantize(w, group_size, maxq=15):
    out = w.clone()
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            g = w[r, start:start + group_size]
            scale = (g.max() - g.min()).clamp(min=1e-5) / maxq  # tensor arithmetic, as AutoAWQ (float32 here)
            zero = (-torch.round(g.min() / scale)).clamp(0, maxq)
            q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
            out[r, start:start + group_size] = (q - zero) * scale
    return out


def _data(seed=0, out=48, columns=96, tokens=200):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, columns, generator=g)
    x = torch.randn(tokens, columns, generator=g) * torch.linspace(0.05, 3, columns)  # uneven channels
    return w, x


def test_pseudo_quantize_matches_the_reference():
    w, _ = _data()
    expected = _reference_pseudo_quantize(w, 32)
    torch.testing.assert_close(awq.pseudo_quantize(w, CONFIG), expected, rtol=0, atol=1e-6)
    r = awq.quantize(w, CONFIG)
    torch.testing.assert_close(awq.dequantize(r.q, r.scales, r.zeros, 32), expected, rtol=0, atol=1e-6)
    assert int(r.q.min()) >= 0 and int(r.q.max()) <= 15


def test_scale_search_matches_the_reference():
    w1, x = _data(1)
    w2, _ = _data(2)
    weights = [w1, w2]

    def inspect(ws):
        return [x @ ws[0].T, x @ ws[1].T]

    found = awq.search_scales(awq.activation_mean([x]), weights, inspect, CONFIG)
    # the reference: AutoAWQ's _compute_best_scale, spelled out
    x_mean = x.abs().mean(0)
    cat = torch.cat(weights)
    grouped = cat.abs().reshape(-1, 32)
    w_mean = (grouped / (grouped.amax(1, keepdim=True) + 1e-6)).reshape(cat.shape).mean(0)
    reference = inspect(weights)
    best = (float("inf"), None, None)
    for i in range(20):
        ratio = i / 20
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        outs = inspect([_reference_pseudo_quantize(w * s, 32) / s for w in weights])
        errors = sum(float((r - o).pow(2).sum()) for r, o in zip(reference, outs, strict=True))
        loss = errors / sum(r.numel() for r in reference)
        assert loss == pytest.approx(found.losses[i], rel=1e-4)
        if loss < best[0]:
            best = (loss, ratio, s)
    assert found.ratio == best[1]
    torch.testing.assert_close(found.scales, best[2])
    assert min(found.losses) < found.losses[0]  # activation-aware scales beat plain quantization here


def test_clip_search_matches_the_reference():
    w, x = _data(3, out=20)  # 20 rows: the clip batch of 8 below leaves a short last batch
    config = awq.AWQConfig(group_size=32, clip_tokens=64, clip_batch=8)
    max_val = awq.search_clip(w, x, config)
    sample = x[::max(1, x.shape[0] // 64)]
    for r in range(w.shape[0]):
        for gi, start in enumerate(range(0, w.shape[1], 32)):
            g, xs = w[r, start:start + 32], sample[:, start:start + 32]
            org = xs @ g
            best, best_err = float(g.abs().max()), float("inf")
            for i in range(10):
                m = float(g.abs().max()) * (1 - i / 20)
                q = _reference_pseudo_quantize(g.clamp(-m, m)[None], 32)[0]
                err = float((xs @ q - org).pow(2).mean())
                if err < best_err:
                    best, best_err = m, err
            assert float(max_val[r, gi]) == pytest.approx(best, rel=1e-5), (r, gi)
    clipped = awq.clip(w, max_val, 32)
    assert torch.all(clipped.abs().reshape(20, 3, 32) <= max_val[..., None] + 1e-7)


def test_bad_settings_and_inputs():
    with pytest.raises(QuantkitError, match="4 or 8 bits"):
        awq.AWQConfig(bits=3)
    with pytest.raises(QuantkitError, match="32, 64, 128"):
        awq.AWQConfig(group_size=100)
    with pytest.raises(QuantkitError, match="divisible by the group size"):
        awq.quantize(torch.randn(8, 40), CONFIG)
    with pytest.raises(QuantkitError, match="NaN"):
        awq.quantize(torch.full((8, 32), float("nan")), CONFIG)
