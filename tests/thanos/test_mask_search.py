"""Mask search by ADMM: the pattern stays exact, and the result is never worse than the solver's mask."""
import pytest
import torch

from thanos import PruneConfig, prune_weight
from thanos.api import quadratic_error
from thanos.config import ConfigError, Pattern
from thanos.mask_search import admm_mask_search, project
from thanos.hessian import Curvature
from tests.thanos.helpers import assert_nm, layer_problem

EPS = torch.finfo(torch.float32).eps


def test_projection_keeps_the_largest_per_group_and_the_rows_counts():
    Z = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    start = torch.zeros(6, 16, dtype=torch.bool)
    start[:5, ::2] = True  # rows 0-4 half removed; row 5 a dense outlier row
    D, mask = project(Z, start, Pattern.parse("2:4"))
    assert_nm(D[:5], 2, 4)
    assert not mask[5].any() and torch.equal(D[5], Z[5])
    kept = Z[:5].abs().reshape(5, 4, 4).topk(2, -1).values.sort(-1).values
    assert torch.equal(D[:5].abs().reshape(5, 4, 4).sort(-1).values[..., 2:], kept)
    start[0, :] = False
    start[0, :3] = True  # unstructured: each row keeps as many as its starting mask
    D, mask = project(Z, start, Pattern.parse("unstructured"))
    assert torch.equal(mask.sum(1), start.sum(1))
    assert float(Z[0].abs()[mask[0]].max()) <= float(Z[0].abs()[~mask[0]].min())


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_search_then_refit_lowers_the_error_and_keeps_the_pattern(pattern):
    W, H = layer_problem(512, 32, 64, seed=5)
    sparsity = 0.5 if pattern == "unstructured" else None
    plain = prune_weight(W, H, PruneConfig("thanos", pattern, sparsity, block_size=16, refit_iterations=50,
                                           mask_search_iterations=0))
    searched = prune_weight(W, H, PruneConfig("thanos", pattern, sparsity, block_size=16, refit_iterations=50,
                                              mask_search_iterations=30))
    Hd = Curvature(H).damped(0.01)
    before, after = quadratic_error(plain.weight, W, Hd), quadratic_error(searched.weight, W, Hd)
    round_off = 64 * 64 * EPS * quadratic_error(torch.zeros_like(W), W, Hd)  # sums of c products over 64 rows
    assert after <= before + round_off
    assert after < before and searched.mask_changed > 0  # here the search finds a better support
    assert torch.equal(searched.weight[searched.mask], torch.zeros(int(searched.mask.sum())))
    if pattern == "unstructured":
        assert torch.equal(searched.mask.sum(1), plain.mask.sum(1))
    else:
        p = Pattern.parse(pattern)
        assert_nm(searched.weight, p.n, p.m)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_group_ranking_keeps_the_largest_and_breaks_ties_by_column(n, m):
    """The pairwise ranking keeps what a top-k keeps; of equal magnitudes the later column goes first,
    so a group of zeros (an input no token reached) still loses exactly n."""
    from thanos.mask_search import nm_keep

    Z = torch.randn(32, 8 * m, generator=torch.Generator().manual_seed(3))
    Z[0, :m] = 0.0
    Z[1, :m] = -2.5
    keep = nm_keep(Z, n, m)
    assert keep.dtype == Z.dtype and set(keep.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(keep.reshape(32, 8, m).sum(-1), torch.full((32, 8), float(m - n)))
    largest = Z.abs().reshape(32, 8, m).topk(m - n, dim=-1).values.sort(-1).values
    kept = (Z.abs() * keep).reshape(32, 8, m).sort(-1).values[..., n:]
    assert torch.equal(kept[2:], largest[2:])
    for row in (0, 1):  # ties: the first m - n columns stay
        assert keep[row, :m].tolist() == [1.0] * (m - n) + [0.0] * n


def test_reported_error_equals_the_direct_formula():
    """The default preset's reported error comes from the damped errors its steps computed (no
    product of its own); it must be the relative output error itself, a never-active input and the
    damping taken back out, to the round-off of fp32 products over c inputs."""
    from thanos.hessian import reconstruction_error

    W, H = layer_problem(512, 32, 64, seed=4)
    H[5, :] = 0.0
    H[:, 5] = 0.0  # input 5 never active
    result = prune_weight(W, H, PruneConfig("thanos", "2:4", preset="default"))
    direct = reconstruction_error(W, result.weight, H)
    Hd = Curvature(H).damped(0.01)
    # The damped sums are up to this many times the undamped ones they are turned into.
    amplification = max(quadratic_error(result.weight, W, Hd) / (direct * quadratic_error(torch.zeros_like(W), W, H)),
                        quadratic_error(torch.zeros_like(W), W, Hd) / quadratic_error(torch.zeros_like(W), W, H))
    assert result.error == pytest.approx(direct, rel=64 * 64 * EPS * amplification)


def test_a_search_that_loses_keeps_the_solvers_mask(monkeypatch):
    import thanos.recipe as recipe
    from thanos.mask_search import SearchResult

    W, H = layer_problem(256, 16, 32, seed=7)
    plain = prune_weight(W, H, PruneConfig("thanos", "2:4", block_size=16, refit_iterations=20,
                                           mask_search_iterations=0))

    def worse(X, mask, target, Hd, pattern, iterations, scaled=None, layer=None):  # the opposite pair of every group's choice
        flipped = mask.reshape(16, 8, 4).flip(-1).reshape(16, 32)
        return SearchResult(target.masked_fill(flipped, 0.0), flipped, 1.0)

    monkeypatch.setattr(recipe, "admm_mask_search", worse)
    kept = prune_weight(W, H, PruneConfig("thanos", "2:4", block_size=16, refit_iterations=20,
                                          mask_search_iterations=5))
    assert torch.equal(kept.mask, plain.mask) and torch.equal(kept.weight, plain.weight)
    assert kept.mask_changed == 0.0


def test_search_starts_from_its_inputs_without_changing_them():
    W, H = layer_problem(256, 8, 32, seed=9)
    pruned = prune_weight(W, H, PruneConfig("thanos", "2:4", block_size=16, refit_iterations=0,
                                            mask_search_iterations=0))
    weight, mask = pruned.weight.clone(), pruned.mask.clone()
    found = admm_mask_search(pruned.weight, pruned.mask, W, Curvature(H).damped(0.01), Pattern.parse("2:4"), 9)
    assert torch.equal(pruned.weight, weight) and torch.equal(pruned.mask, mask)
    assert found.weight.dtype == torch.float32
    assert found.changed == float((found.mask != mask).float().mean())


def test_columns_pattern_refuses_a_search():
    with pytest.raises(ConfigError, match="columns"):
        PruneConfig("thanos", "columns", mask_search_iterations=10)


def test_ridge_factors_solve_the_penalised_system():
    from thanos.mask_search import ScaledHessian

    W, H = layer_problem(256, 8, 32, seed=11)
    Hd = Curvature(H).damped(0.01)
    scaled = ScaledHessian.of(Hd)
    assert torch.equal(scaled.Hs.diagonal(), torch.ones(32))
    exact = Hd.double() / torch.outer(Hd.diagonal().double().sqrt(), Hd.diagonal().double().sqrt())
    for rho in (0.3, 3.0):
        L = scaled.ridge_factor(rho, keep=False).double()
        shifted = exact + rho * torch.eye(32, dtype=torch.float64)
        # fp32 scaling and factorisation: round-off of c-term sums of entries up to the largest eigenvalue
        bound = 32 * 32 * EPS * float(torch.linalg.eigvalsh(shifted).max())
        assert float((L @ L.T - shifted).abs().max()) <= bound
    assert not scaled.factors  # keep=False caches nothing
    assert scaled.ridge_factor(0.3, keep=True) is scaled.ridge_factor(0.3, keep=True)


def test_search_stops_once_the_support_settles(monkeypatch):
    """Kept weights 100x the removed ones under a diagonal Hessian: far past what the dual can carry
    across (a removed weight's projected value tends to its value / rho), so no weight ever changes
    support, and the search stops after its first penalty period instead of running 30 iterations."""
    import thanos.mask_search as mask_search

    calls = []
    nm_keep = mask_search.nm_keep
    monkeypatch.setattr(mask_search, "nm_keep", lambda *a, **k: calls.append(1) or nm_keep(*a, **k))
    g = torch.Generator().manual_seed(12)
    magnitude = torch.tensor([100.0, 100.0, 1.0, 1.0]).repeat(16, 8)
    W = magnitude * torch.where(torch.rand(16, 32, generator=g) < 0.5, -1.0, 1.0)
    start = magnitude == 1.0
    H = torch.eye(32)
    found = admm_mask_search(W.masked_fill(start, 0.0), start, W, Curvature(H).damped(0.01), Pattern.parse("2:4"), 30)
    assert torch.equal(found.mask, start) and found.changed == 0.0
    assert len(calls) == mask_search.RHO_EVERY


def test_a_ridge_system_that_cannot_be_factorised_names_the_fix():
    """Only a penalty far below any search's (a rank-4 Hessian of 32 inputs, undamped, plus 1e-7)
    leaves the ridge system indefinite in fp32; the error says what to change."""
    from thanos.hessian import FactorizationError
    from thanos.mask_search import ScaledHessian

    X = torch.randn(4, 32, generator=torch.Generator().manual_seed(14))
    scaled = ScaledHessian.of(X.T @ X / 4)
    with pytest.raises(FactorizationError, match="fewer mask search iterations"):
        scaled.ridge_factor(1e-7, keep=False, layer="mlp.down_proj")
    assert bool(torch.isfinite(scaled.ridge_factor(0.01, keep=False)).all())  # a search's penalty is fine
