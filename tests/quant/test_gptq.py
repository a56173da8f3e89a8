"""GPTQ and RTN against a plain reference written here from the GPTQ paper (Algorithm 1) and FORMATS.md §5.5:
float64, one column at a time, every remaining column updated at once, H^-1 by explicit inversion."""

import logging
import math
from dataclasses import replace

import pytest
import torch

from quantkit.errors import ConfigError, QuantkitError
from quantkit.quant.gptq import GPTQConfig, HessianAccumulator, dequantize, gptq_quantize, rtn_quantize

ROWS, COLUMNS = 24, 160  # two blocks of 128 + 32; groups of 32/64 start inside a block, 64/128 end short


# ---- the reference --------------------------------------------------------------------------------------------
def ref_grid(x: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of x [rows, cols], one row at a time, in float32 as the references: the grid has
    exact ties (an empty asymmetric group has zero point round(maxq / 2)) that float64 would break differently."""
    maxq = 2 ** cfg.bits - 1
    scales, zeros = [], []
    for row in x.float():
        xmin, xmax = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        if cfg.sym:
            xmax = max(-xmin, xmax)
            if xmin < 0:
                xmin = -xmax
        if xmin == 0 and xmax == 0:
            xmin, xmax = -1.0, 1.0
        xmin_t, xmax_t = row.new_tensor(xmin), row.new_tensor(xmax)
        scale = (xmax_t - xmin_t) / maxq
        zero = row.new_tensor((maxq + 1) / 2) if cfg.sym else torch.round(-xmin_t / scale)
        if cfg.mse:  # shrink the range by p = 1, 0.99, ..., 0.21 and keep the lowest sum |error|^2.4
            best = math.inf
            for i in range(80):
                p = 1 - i / 100
                s = (p * xmax_t - p * xmin_t) / maxq
                z = zero if cfg.sym else torch.round(-(p * xmin_t) / s)
                err = (ref_dequant(row, s, z, maxq) - row).abs().pow(2.4).sum().item()
                if err < best:
                    best, scale, zero = err, s, z
        scales.append(scale)
        zeros.append(zero)
    return torch.stack(scales).to(x.dtype), torch.stack(zeros).to(x.dtype)


def ref_codes(w, scale, zero, maxq):
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def ref_dequant(w, scale, zero, maxq):
    return scale * (ref_codes(w, scale, zero, maxq) - zero)


def ref_gptq(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, damp_percent: float | None = None) -> dict:
    """Returns q, scales, zeros, g_idx, w_hat, loss in original column order, and `ratio`: w / scale of every weight
    at the moment it was rounded, in processing order (to tell rounding ties from real differences)."""
    W, H = W.double().clone(), H.double().clone()
    rows, K = W.shape
    maxq = 2 ** cfg.bits - 1
    gs = K if cfg.group_size == -1 else cfg.group_size
    n_groups = -(-K // gs)
    if cfg.group_size == -1:
        row_grid = ref_grid(W, cfg)  # before dead columns are zeroed, as the references
    for i in range(K):
        if H[i, i] == 0:
            H[i, i] = 1
            W[:, i] = 0
    static = cfg.static_groups and cfg.group_size != -1
    if static:
        static_grids = [ref_grid(W[:, g * gs:(g + 1) * gs], cfg) for g in range(n_groups)]
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if cfg.desc_act else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += (cfg.damp_percent if damp_percent is None else damp_percent) * torch.diagonal(H).mean() * torch.eye(K)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)

    q = torch.zeros_like(W)
    ratio = torch.zeros_like(W)
    group_of_position = []
    grids = []
    loss = 0.0
    for j in range(K):
        if j % cfg.block_size == 0:
            # the implementation finds a group's grid on W as its lazy updates left it: updated by every block before
            # this one, which is what every column still waiting looks like here at a block start
            at_block_start = W.clone()
        if cfg.group_size == -1:
            g, (scale, zero) = 0, row_grid
        elif static:
            g = perm[j].item() // gs
            scale, zero = static_grids[g]
        else:
            if j % gs == 0:
                grids.append(ref_grid(at_block_start[:, j:j + gs], cfg))
            g = j // gs
            scale, zero = grids[g]
        group_of_position.append(g)
        w = W[:, j]
        ratio[:, j] = w / scale
        q[:, j] = ref_codes(w, scale, zero, maxq)
        err = (w - scale * (q[:, j] - zero)) / U[j, j]
        loss += (err ** 2).sum().item() / 2
        W[:, j:] -= torch.outer(err, U[j, j:])  # all remaining columns at once: no lazy batches here

    if cfg.group_size == -1:
        grids = [row_grid]
    elif static:
        grids = static_grids
    scales = torch.stack([s for s, _ in grids], 1)
    zeros = torch.stack([z for _, z in grids], 1)
    invperm = torch.argsort(perm)
    g_idx = torch.tensor(group_of_position)[invperm]
    q = q[:, invperm]
    w_hat = torch.stack([scales[r, g_idx] * (q[r] - zeros[r, g_idx]) for r in range(rows)])
    return {"q": q, "scales": scales, "zeros": zeros, "g_idx": g_idx, "w_hat": w_hat, "loss": loss, "ratio": ratio,
            "perm": perm}


def ref_rtn(W: torch.Tensor, cfg: GPTQConfig) -> dict:
    K = W.shape[1]
    gs = K if cfg.group_size == -1 else cfg.group_size
    grids = [ref_grid(W[:, g:g + gs], cfg) for g in range(0, K, gs)]
    g_idx = torch.arange(K) // gs
    q = torch.cat([ref_codes(W[:, g * gs:(g + 1) * gs], s[:, None], z[:, None], cfg.maxq)
                   for g, (s, z) in enumerate(grids)], 1)
    return {"q": q, "scales": torch.stack([s for s, _ in grids], 1), "zeros": torch.stack([z for _, z in grids], 1),
            "g_idx": g_idx}


def assert_matches_reference(res, ref: dict, max_tie_rows: int = 2) -> int:
    """Rows are independent in GPTQ, so a code that rounds the other way at a tie (a w / scale within 1e-3 of
    k + 0.5 in the reference, where float32 and float64 may disagree) changes the rest of its row only. Every other
    row must match: codes exactly, w_hat / scales to float32 precision. Returns the number of rows that flipped."""
    q, scales, zeros, w_hat = (t.cpu().double() for t in (res.q, res.scales, res.zeros, res.w_hat))
    assert torch.equal(res.g_idx.cpu().long(), ref["g_idx"])
    order = ref["perm"]
    flipped = 0
    for r in range(q.shape[0]):
        differs = (q[r, order] != ref["q"][r, order]).nonzero()
        if len(differs):
            first = differs[0].item()
            distance_to_tie = ((ref["ratio"][r, first].abs() % 1) - 0.5).abs().item()
            assert distance_to_tie < 1e-3, f"row {r}: position {first} differs {distance_to_tie} away from a tie"
            flipped += 1
            continue
        assert torch.equal(zeros[r], ref["zeros"][r])
        torch.testing.assert_close(scales[r], ref["scales"][r], rtol=1e-5, atol=0)
        torch.testing.assert_close(w_hat[r], ref["w_hat"][r], rtol=1e-5, atol=1e-6)
    assert flipped <= max_tie_rows
    return flipped


# ---- data -----------------------------------------------------------------------------------------------------
def correlated_inputs(n: int, K: int = COLUMNS, seed: int = 0) -> torch.Tensor:
    """Inputs like an LLM's activations: channels driven by a few shared directions (a 32-dimensional signal plus
    noise), channel scales spread over e^(+-2)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(32, K, generator=torch.Generator().manual_seed(1234))
    channel_scale = torch.exp(torch.randn(K, generator=torch.Generator().manual_seed(99)))
    return (torch.randn(n, 32, generator=gen) @ directions + 0.3 * torch.randn(n, K, generator=gen)) * channel_scale


def hessian(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[1])
    acc.add(X.reshape(-1, 64, X.shape[1]))
    return acc.H


def weight(seed: int = 0, rows: int = ROWS, K: int = COLUMNS) -> torch.Tensor:
    W = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed))
    W[1] = W[1].abs()  # all non-negative: the sym grid keeps xmin = 0
    W[2, :40] = 0  # zero groups
    return W


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Thousands of tiny ops: intra-op threads waiting for a descheduled sibling on a busy machine cost more than
    they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def H() -> torch.Tensor:
    return hessian(correlated_inputs(512))


CASES = [  # (bits, group_size, sym, desc_act, static_groups): every value of each next to the others
    (4, 128, True, False, False),
    (4, 128, False, True, False),
    (4, -1, True, True, False),
    (4, 32, False, False, False),
    (4, 64, True, True, True),
    (3, -1, False, False, False),
    (3, 32, True, True, False),
    (3, 64, False, True, True),
    (2, 64, True, False, False),
    (2, 32, False, True, False),
    (2, 128, True, False, True),
    (8, 32, True, True, True),
    (8, -1, False, True, False),
    (8, 64, False, False, False),
]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,static_groups", CASES)
def test_gptq_matches_reference(H, bits, group_size, sym, desc_act, static_groups):
    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups)
    W = weight()
    res = gptq_quantize(W, H, cfg)
    ref = ref_gptq(W, H, cfg)
    assert res.q.dtype == res.zeros.dtype == res.g_idx.dtype == torch.int32
    assert res.scales.dtype == res.w_hat.dtype == torch.float32
    n_groups = 1 if group_size == -1 else -(-COLUMNS // group_size)
    assert res.scales.shape == res.zeros.shape == (ROWS, n_groups)
    assert int(res.q.min()) >= 0 and int(res.q.max()) <= 2 ** bits - 1
    assert torch.equal(res.w_hat, dequantize(res.q, res.scales, res.zeros, res.g_idx))
    if sym:
        assert bool((res.zeros == 2 ** (bits - 1)).all())
    if not assert_matches_reference(res, ref):
        assert res.loss == pytest.approx(ref["loss"], rel=1e-4)
    assert res.damp_percent == 0.01 and res.damp_retries == 0


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 32, False, True), (3, -1, True, False)])
def test_gptq_mse_grid_matches_reference(H, bits, group_size, sym, desc_act):
    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, mse=True)
    W = weight(1, rows=8)  # the reference searches one row at a time
    assert_matches_reference(gptq_quantize(W, H, cfg), ref_gptq(W, H, cfg))


def test_block_size_is_the_references_lazy_batch(H):
    """Groups of 32 start inside 64-column blocks: their grids see W as the block started, as the references do."""
    cfg = GPTQConfig(bits=3, group_size=32, sym=False, desc_act=True, block_size=64)
    W = weight(2)
    res = gptq_quantize(W, H, cfg)
    assert_matches_reference(res, ref_gptq(W, H, cfg))
    assert not torch.equal(res.q, gptq_quantize(W, H, replace(cfg, block_size=128)).q)


def test_dead_input_columns():
    X = correlated_inputs(512)
    dead = [0, 7, 100, 159]
    X[:, dead] = 0
    H = hessian(X)
    W = weight(3)
    for cfg in (GPTQConfig(bits=4, group_size=32, desc_act=True), GPTQConfig(bits=3, group_size=-1, sym=False)):
        res = gptq_quantize(W, H, cfg)
        assert_matches_reference(res, ref_gptq(W, H, cfg))
        assert bool((res.w_hat[:, dead] == 0).all())
        g = res.g_idx[dead].long()
        assert torch.equal(res.q[:, dead], res.zeros[:, g])


def test_non_positive_definite_hessian_retries_with_more_damping(H, caplog):
    lowest = torch.linalg.eigvalsh(H.double())[0].item()
    mean = torch.diagonal(H).mean().item()
    bad = H - (lowest + 0.05 * mean) * torch.eye(COLUMNS)  # lowest eigenvalue -5% of the mean diagonal
    cfg = GPTQConfig(bits=4, group_size=64)
    W = weight(4)
    with caplog.at_level(logging.WARNING, logger="quantkit.quant.gptq"):
        res = gptq_quantize(W, bad, cfg)
    assert res.damp_retries == 1
    assert res.damp_percent == pytest.approx(0.1)
    assert "damp_percent 0.01; used 0.1 (1 retries)" in caplog.text
    assert_matches_reference(res, ref_gptq(W, bad, cfg, damp_percent=0.1))


def test_unusable_hessians_raise():
    W = weight(5, K=4)
    cfg = GPTQConfig(group_size=-1)
    hopeless = torch.full((4, 4), 1e4) - (1e4 - 1) * torch.eye(4)  # eigenvalues down to -1e4 + 1, mean diagonal 1
    with pytest.raises(QuantkitError, match="not positive definite even with damp_percent 100"):
        gptq_quantize(W, hopeless, cfg)
    with pytest.raises(QuantkitError, match="NaN or infinite"):
        gptq_quantize(W, torch.full((4, 4), math.nan), cfg)
    with pytest.raises(QuantkitError, match="all-zero Hessian"):
        gptq_quantize(W, torch.zeros(4, 4), cfg)
    with pytest.raises(QuantkitError, match="mean diagonal is -1"):
        gptq_quantize(W, -2 * torch.eye(4) + torch.diag(torch.tensor([0.0, 0, 0, 4])), cfg)
    with pytest.raises(QuantkitError, match="weight to quantize holds NaN"):
        gptq_quantize(W.clone().fill_(math.inf), torch.eye(4), cfg)


def output_error(W: torch.Tensor, w_hat: torch.Tensor, X: torch.Tensor) -> float:
    return ((W - w_hat) @ X.T).norm().item()


@pytest.mark.parametrize("bits,group_size,desc_act", [(4, 128, False), (4, 32, True), (3, -1, True), (2, 64, False),
                                                             (2, 64, True), (8, 32, False)])
def test_gptq_beats_rtn_on_held_out_correlated_inputs(H, bits, group_size, desc_act):
    held_out = correlated_inputs(512, seed=1)
    W = weight(6)
    cfg = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    ratio = (output_error(W, gptq_quantize(W, H, cfg).w_hat, held_out)
             / output_error(W, rtn_quantize(W, cfg).w_hat, held_out))
    print(f"\n{bits}-bit group {group_size} desc_act={desc_act}: GPTQ / RTN output error {ratio:.3f}")
    assert ratio < 0.7


def test_g_idx_with_act_order(H):
    W = weight(7)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    res = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=32, desc_act=True))
    assert torch.equal(res.g_idx[perm].long(), torch.arange(COLUMNS) // 32)  # position p falls in group p // 32
    assert torch.bincount(res.g_idx.long()).tolist() == [32] * 5
    assert not torch.equal(res.g_idx.long(), torch.arange(COLUMNS) // 32)  # the permutation is not the identity
    static = gptq_quantize(W, H, GPTQConfig(bits=4, group_size=32, desc_act=True, static_groups=True))
    assert torch.equal(static.g_idx.long(), torch.arange(COLUMNS) // 32)


def test_deterministic(H):
    W = weight(8)
    cfg = GPTQConfig(bits=3, group_size=64, sym=False, desc_act=True)
    a, b = gptq_quantize(W, H, cfg), gptq_quantize(W, H.clone(), cfg)
    for field in ("q", "scales", "zeros", "g_idx", "w_hat"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.loss == b.loss


def test_inputs_are_not_modified(H):
    X = correlated_inputs(256)
    X[:, 3] = 0
    H_dead = hessian(X)
    W = weight(9)
    W_before, H_before = W.clone(), H_dead.clone()
    gptq_quantize(W, H_dead, GPTQConfig(desc_act=True))
    assert torch.equal(W, W_before) and torch.equal(H_dead, H_before)


@pytest.mark.parametrize("bits,group_size,sym,mse", [(4, 128, True, False), (4, 64, False, False),
                                                     (3, -1, True, True), (2, 48, False, True),
                                                     (8, 32, True, False)])
def test_rtn_matches_reference_exactly(bits, group_size, sym, mse):
    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=sym, mse=mse)
    W = weight(10, rows=8)
    res = rtn_quantize(W, cfg)
    ref = ref_rtn(W, cfg)  # float32 too: RTN has exact ties (sym: the group minimum lands on -(maxq + 1) / 2)
    for field in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(res, field).to(ref[field].dtype), ref[field]), field
    assert torch.equal(res.w_hat, dequantize(res.q, res.scales, res.zeros, res.g_idx))
    assert res.loss is None and res.damp_percent is None


def test_mse_grid_lowers_the_rounding_error():
    gen = torch.Generator().manual_seed(12)
    W = torch.randn(64, 128, generator=gen) * (1 + 9 * (torch.rand(64, 128, generator=gen) < 0.02))  # outliers
    for bits in (2, 3):
        plain, searched = (rtn_quantize(W, GPTQConfig(bits=bits, group_size=32, mse=mse)) for mse in (False, True))
        assert (searched.w_hat - W).abs().pow(2.4).sum() < 0.9 * (plain.w_hat - W).abs().pow(2.4).sum()


def test_hessian_accumulator_is_a_running_average():
    X = correlated_inputs(6 * 64, K=32)
    acc = HessianAccumulator(32)
    acc.add(X[:128].reshape(2, 64, 32))  # 2 sequences
    acc.add(X[128:192])  # 2-D: counts as one sequence, as AutoGPTQ
    acc.add(X[192:].reshape(3, 64, 32))
    acc.add(X[:0])  # an MoE expert nobody was routed to
    assert acc.n == 6
    torch.testing.assert_close(acc.H, 2 / 6 * X.T @ X, rtol=1e-5, atol=1e-4)
    per_token = HessianAccumulator(32)
    for chunk in X.split(100):
        per_token.add(chunk, samples=chunk.shape[0])
    assert per_token.n == X.shape[0]
    torch.testing.assert_close(per_token.H, 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="32 columns"):
        acc.add(torch.zeros(3, 31))


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 5}, "bits must be one of 2, 3, 4, 8"),
    ({"bits": 4.0}, "bits must be one of"),
    ({"group_size": 0}, "group_size must be -1"),
    ({"group_size": -2}, "group_size must be -1"),
    ({"damp_percent": 0}, "damp_percent must be between 0 and 1"),
    ({"damp_percent": 1.5}, "damp_percent must be between 0 and 1"),
    ({"block_size": 0}, "block_size must be a positive"),
    ({"sym": 1}, "sym must be true or false"),
    ({"desc_act": "yes"}, "desc_act must be true or false"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GPTQConfig(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu(H):
    W = weight(11)
    cfg = GPTQConfig(bits=4, group_size=32, sym=False, desc_act=True)
    cpu = gptq_quantize(W, H, cfg)
    gpu = gptq_quantize(W.cuda(), H.cuda(), cfg)
    assert gpu.q.is_cuda and gpu.w_hat.is_cuda
    assert_matches_reference(gpu, ref_gptq(W, H, cfg))
    assert (gpu.q.cpu() != cpu.q).any(1).sum() <= 2
