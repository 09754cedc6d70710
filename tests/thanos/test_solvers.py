import math

import pytest
import torch

from thanos import ConfigError, prune_weight as _prune_weight
from tests.thanos.helpers import assert_nm, damped, hessian_of, realistic_inputs, solve_tolerance


def prune_weight(weight, hessian, method="thanos", *args, **kwargs):
    """The solvers themselves: Thanos without the refit its default preset adds (tested in test_refit.py)."""
    if method == "thanos":
        kwargs.setdefault("preset", "fast")
    return _prune_weight(weight, hessian, method, *args, **kwargs)

METHODS = ["thanos", "sparsegpt", "wanda", "magnitude"]


def naive_thanos(W, H, pattern, sparsity, B, damp=0.01):
    """docs/ALGORITHM.md sections 2-4 row by row, re-inverting the trailing Hessian at every block."""
    W = W.double().clone()
    H = H.double()
    s = torch.diag(H)
    Hd = damped(H, damp)
    rows, cols = W.shape
    budget, removed = math.floor(sparsity * rows * cols), 0
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        G = torch.linalg.inv(Hd[i1:, i1:])
        metric = W[:, i1:].abs() * s[i1:].sqrt()
        block = torch.zeros(rows, i2 - i1, dtype=torch.bool)
        if pattern is not None:
            n, m = pattern
            for g in range(0, i2 - i1, m):
                drop = torch.argsort(metric[:, g:g + m], dim=1)[:, :n]
                block[:, g:g + m].scatter_(1, drop, True)
        else:
            chosen = torch.topk(metric.flatten(), budget - removed, largest=False).indices
            region = torch.zeros(metric.numel(), dtype=torch.bool)
            region[chosen] = True
            block = region.reshape(metric.shape)[:, : i2 - i1]
            removed += int(block.sum())
        for i in range(rows):
            q = block[i].nonzero().flatten()
            if q.numel():
                lam = torch.linalg.solve(G[q][:, q], W[i, i1 + q])
                W[i, i1:] -= lam @ G[q, :]
                W[i, i1 + q] = 0
        mask[:, i1:i2] = block
    return W, mask


def masked_least_squares(W, H, mask, damp):
    """Per-row optimum of (w' - w) Hd (w' - w)^T with w' zero on the mask, by torch.linalg.lstsq."""
    Hd = damped(H.double(), damp)
    Lt = torch.linalg.cholesky(Hd).T  # Hd = Lt^T Lt, objective = ||Lt (w' - w)^T||^2
    out = torch.zeros_like(W, dtype=torch.float64)
    for i in range(W.shape[0]):
        keep = (~mask[i]).nonzero().flatten()
        sol = torch.linalg.lstsq(Lt[:, keep], Lt @ W[i].double()).solution
        out[i, keep] = sol
    return out


@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("4:8", None), ("unstructured", 0.6)])
def test_single_block_equals_row_least_squares(pattern, sparsity):
    W = torch.randn(12, 64)
    H = hessian_of(realistic_inputs(256, 64))
    result = prune_weight(W, H, "thanos", pattern, sparsity, block_size=64)
    oracle = masked_least_squares(W, H, result.mask, result.damp_used)
    assert (result.weight.double() - oracle).abs().max() <= solve_tolerance(W, H, result.damp_used)


@pytest.mark.parametrize("pattern, sparsity, block", [
    ((2, 4), 0.5, 16), ((4, 8), 0.5, 32), (None, 0.5, 16), (None, 0.7, 24),
])
def test_one_cholesky_equals_per_block_reinversion(pattern, sparsity, block):
    W = torch.randn(10, 96)
    H = hessian_of(realistic_inputs(400, 96))
    name = f"{pattern[0]}:{pattern[1]}" if pattern else "unstructured"
    result = prune_weight(W, H, "thanos", name, None if pattern else sparsity, block_size=block)
    ref_weight, ref_mask = naive_thanos(W, H, pattern, sparsity, block)
    assert torch.equal(result.mask, ref_mask)
    assert (result.weight.double() - ref_weight).abs().max() <= solve_tolerance(W, H, result.damp_used)


def test_per_block_strategy_of_the_solver_agrees():
    from thanos.config import Pattern
    from thanos.solvers.thanos import thanos_prune

    W = torch.randn(32, 256)
    H = hessian_of(realistic_inputs(1024, 256))
    fast = thanos_prune(W.clone(), H, Pattern.parse("2:4"), 0.5, 64)
    slow = thanos_prune(W.clone(), H, Pattern.parse("2:4"), 0.5, 64, trailing_inverse="per-block")
    assert torch.equal(fast.mask, slow.mask)
    assert (fast.weight - slow.weight).abs().max() <= 2 * solve_tolerance(W, H, fast.damp_used)  # two fp32 solves


def test_per_block_strategy_refuses_columns():
    from thanos.config import Pattern
    from thanos.solvers.thanos import thanos_prune

    with pytest.raises(ValueError, match="block-wise"):
        thanos_prune(torch.randn(4, 16), torch.eye(16), Pattern.parse("columns"), 0.5, None, trailing_inverse="per-block")


@pytest.mark.parametrize("k", [16, 17, 33, 64, 101])
def test_batched_cholesky_recursion_equals_lapack(k):
    from thanos.solvers.thanos import _batched_cholesky

    X = torch.randn(6, k, 2 * k, dtype=torch.float64)
    A = X @ X.mT / (2 * k) + 0.01 * torch.eye(k, dtype=torch.float64)
    L, info = _batched_cholesky(A)
    assert torch.equal(info, torch.zeros(6, dtype=info.dtype))
    eig = torch.linalg.eigvalsh(A)  # fp64 round-off of k-term sums, by the condition number, at L's scale
    bound = k * torch.finfo(torch.float64).eps * float((eig[:, -1] / eig[:, 0]).max()) * float(eig[:, -1].max()) ** 0.5
    assert (L - torch.linalg.cholesky(A)).abs().max() <= bound


def test_spd_solve_flags_and_recovers_an_indefinite_system():
    from thanos.solvers.thanos import _batched_cholesky, _spd_solve

    X = torch.randn(3, 40, 80)
    A = X @ X.mT / 80 + 0.1 * torch.eye(40)
    A[1, 30, 30] = -5.0  # indefinite in the second half: the recursion's Schur complement fails
    b = torch.randn(3, 40)
    _, info = _batched_cholesky(A)
    assert info.tolist()[0] == 0 and info.tolist()[1] != 0 and info.tolist()[2] == 0
    x = _spd_solve(A, b)
    expected = torch.linalg.solve(A, b)
    singular = torch.linalg.svdvals(A)  # (3, 40): fp32 round-off of 40-term sums, by each system's condition
    bound = 40 * torch.finfo(torch.float32).eps * (singular[:, 0] / singular[:, -1]) * expected.abs().amax(1)
    assert ((expected - x).abs().amax(1) <= bound).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_with_identity_hessian_is_magnitude(pattern):
    W = torch.randn(24, 64)
    sparse = prune_weight(W, torch.eye(64), "sparsegpt", pattern)
    magnitude = prune_weight(W, None, "magnitude", pattern)
    assert torch.equal(sparse.weight, magnitude.weight)
    assert torch.equal(sparse.mask, magnitude.mask)


def test_wanda_exact_small_case():
    # Row 0: metric |w| * sqrt(s) = [1*1, 4*0.5, 3*1, 0.5*2] -> remove columns 0 and 3 (2:4).
    W = torch.tensor([[1.0, 4.0, -3.0, 0.5], [2.0, -1.0, 0.1, 1.0]])
    s = torch.tensor([1.0, 0.25, 1.0, 4.0])
    result = prune_weight(W, torch.diag(s), "wanda", "2:4")
    assert result.mask.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert result.weight.tolist() == [[0.0, 4.0, -3.0, 0.0], [2.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_patterns_are_exact(method, pattern):
    W = torch.randn(40, 128)
    H = hessian_of(realistic_inputs(512, 128))
    result = prune_weight(W, H, method, pattern, block_size=32 if method == "thanos" else None)
    n, m = map(int, pattern.split(":"))
    assert_nm(result.weight, n, m)
    assert result.mask.reshape(40, -1, m).sum(-1).eq(n).all()  # exactly n removed per group
    assert torch.equal(result.weight == 0, result.mask)


@pytest.mark.parametrize("method", ["thanos", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.37])
def test_unstructured_zero_count_is_exact(method, sparsity):
    W = torch.randn(33, 96)
    H = hessian_of(realistic_inputs(400, 96))
    result = prune_weight(W, H, method, "unstructured", sparsity, block_size=32 if method == "thanos" else None)
    expected = math.floor(sparsity * W.numel())
    assert int(result.mask.sum()) == expected
    assert int((result.weight == 0).sum()) == expected


def test_wanda_unstructured_compares_within_rows():
    W = torch.randn(8, 40)
    result = prune_weight(W, torch.eye(40), "wanda", "unstructured", 0.25)
    assert result.mask.sum(1).eq(10).all()


@pytest.mark.parametrize("method", ["thanos", "wanda", "magnitude"])
def test_columns_pattern_removes_whole_columns(method):
    W = torch.randn(16, 64)
    H = hessian_of(realistic_inputs(256, 64))
    result = prune_weight(W, H, method, "columns", 0.3)
    removed_cols = result.mask.all(0)
    assert int(removed_cols.sum()) == math.ceil(0.3 * 64)
    assert torch.equal(result.mask, removed_cols[None].expand_as(result.mask))
    assert (result.weight[:, removed_cols] == 0).all()


def test_thanos_columns_is_least_squares_optimal():
    W = torch.randn(16, 48)
    H = hessian_of(realistic_inputs(256, 48))
    result = prune_weight(W, H, "thanos", "columns", 0.25)
    oracle = masked_least_squares(W, H, result.mask, result.damp_used)
    assert (result.weight.double() - oracle).abs().max() <= solve_tolerance(W, H, result.damp_used)


def test_alpha_rows_stay_dense_and_untouched():
    W = torch.randn(40, 64)
    W[[3, 17, 29]] *= 10  # the three largest rows by sum W^2 s
    H = hessian_of(realistic_inputs(256, 64))
    result = prune_weight(W, H, "thanos", "2:4", alpha=0.1, block_size=32)  # floor(0.1 * 40) = 4 rows
    untouched = (result.weight == W).all(1)
    assert untouched[[3, 17, 29]].all()
    assert int(untouched.sum()) == 4
    assert_nm(result.weight[~untouched], 2, 4)
    assert result.sparsity == pytest.approx(0.5 * 36 / 40)


def test_dead_inputs_are_zeroed_not_nan():
    X = realistic_inputs(256, 32)
    X[:, [5, 20]] = 0
    W = torch.randn(8, 32)
    for method in ["thanos", "sparsegpt"]:
        result = prune_weight(W, hessian_of(X), method, "2:4", block_size=16 if method == "thanos" else None)
        assert torch.isfinite(result.weight).all()
        assert (result.weight[:, [5, 20]] == 0).all()
        assert_nm(result.weight, 2, 4)


def test_ill_conditioned_hessian_escalates_damping():
    A = torch.randn(32, 4)
    H = A @ A.T - 0.05 * torch.diag(A @ A.T).mean() * torch.eye(32)  # indefinite: damp 0.01 cannot fix it
    W = torch.randn(8, 32)
    for method in ["thanos", "sparsegpt"]:
        result = prune_weight(W, H, method, "2:4")
        assert result.damp_escalations >= 1
        assert result.damp_used > 0.01
        assert torch.isfinite(result.weight).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    W = torch.randn(16, 64)
    H = hessian_of(realistic_inputs(256, 64))
    half = prune_weight(W.to(dtype), H, "thanos", "2:4", block_size=32)
    full = prune_weight(W.to(dtype).float(), H, "thanos", "2:4", block_size=32)
    assert half.weight.dtype == dtype
    assert_nm(half.weight, 2, 4)
    assert torch.equal(half.mask, full.mask)
    # the solve runs in fp32 on the upcast weights and writes back in their dtype
    assert torch.equal(half.weight, full.weight.to(dtype))


def test_thanos_beats_wanda_on_realistic_inputs():
    W = torch.randn(64, 256)
    H = hessian_of(realistic_inputs(1024, 256))
    for pattern in ["2:4", "4:8", "unstructured"]:
        thanos = prune_weight(W, H, "thanos", pattern)
        wanda = prune_weight(W, H, "wanda", pattern)
        assert thanos.error < wanda.error, pattern


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(pattern="3:2"), "0 < n < m"),
    (dict(pattern="2:4", sparsity=0.3), "fixes the sparsity"),
    (dict(pattern="4:8", block_size=12), "not a multiple of m=8"),
    (dict(pattern="2:4", weight_cols=30), "not a multiple of m=4"),
    (dict(pattern="2:4", hessian_cols=24), "is the weight transposed"),
    (dict(method="sparsegpt", no_hessian=True), "needs the input statistics"),
])
def test_bad_arguments_name_the_fix(kwargs, fragment):
    cols = kwargs.pop("weight_cols", 32)
    hcols = kwargs.pop("hessian_cols", cols)
    H = None if kwargs.pop("no_hessian", False) else torch.eye(hcols)
    with pytest.raises(ConfigError, match=fragment):
        prune_weight(torch.randn(8, cols), H, **kwargs)


def test_nan_statistics_are_refused():
    H = torch.eye(16)
    H[2, 2] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        prune_weight(torch.randn(4, 16), H, name="model.layers.0.mlp.up_proj")


def test_input_weight_is_not_modified():
    W = torch.randn(8, 32)
    before = W.clone()
    prune_weight(W, hessian_of(realistic_inputs(128, 32)), "thanos", "2:4")
    assert torch.equal(W, before)


@pytest.mark.parametrize("k", [1, 7, 500_000, 2_000_000, 2_100_000])
def test_kth_smallest_is_exact(k):
    from thanos.masks import kth_smallest_and_rank

    values = torch.randn(2_100_000)
    values[:1000] = 0.0  # a block of ties, as dead inputs produce
    assert kth_smallest_and_rank(values, k)[0] == torch.kthvalue(values, k).values
    skewed = torch.sort(values).values  # sorted input: the sample must see every part of it
    assert kth_smallest_and_rank(skewed, k)[0] == torch.kthvalue(skewed, k).values
    threshold, below = kth_smallest_and_rank(values, k)
    assert below == int((values < threshold).sum()) and below < k


def test_kth_smallest_when_the_sample_misses():
    from thanos import masks

    n, k = 2_100_000, 1_000_000
    values = torch.rand(n) + 1.0
    positions = (torch.arange(masks.SAMPLE_SIZE, dtype=torch.float64) * (0.6180339887498949 * n)) % n
    values[positions.long()] = 0.0  # every sampled value is a minimum: the bracket holds only them
    threshold, below = masks.kth_smallest_and_rank(values, k)
    assert threshold == torch.kthvalue(values, k).values
    assert below == int((values < threshold).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_cpu(method, dtype):
    W = torch.randn(64, 256).to(dtype)
    H = hessian_of(realistic_inputs(1024, 256))
    cpu = prune_weight(W, H, method, "2:4")
    gpu = prune_weight(W.cuda(), H.cuda(), method, "2:4")
    assert gpu.weight.device.type == "cuda" and gpu.weight.dtype == dtype
    assert_nm(gpu.weight.cpu(), 2, 4)
    assert (gpu.mask.cpu() != cpu.mask).float().mean() < 0.01  # fp32 maths on both; rare near-ties may flip
    assert gpu.error == pytest.approx(cpu.error, rel=0.02)


@pytest.mark.parametrize("method", ["thanos", "sparsegpt"])
def test_block_solvers_report_progress(method):
    seen = []
    prune_weight(torch.randn(8, 96), torch.eye(96), method, "2:4", block_size=32, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(32, 96), (64, 96), (96, 96)]
