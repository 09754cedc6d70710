"""The refit on the final support: the per-row exact solve, reached by conjugate gradients."""
import pytest
import torch

from thanos import PruneConfig, prune_weight
from thanos.hessian import Curvature
from thanos.refit import refit_on_support
from tests.thanos.helpers import assert_nm, hessian_of, realistic_inputs

EPS = torch.finfo(torch.float32).eps


def exact_support_solve(target, H, mask, damp):
    """Per row, in float64: argmin (x - t) Hd (x - t)^T with x zero on the mask."""
    Hd = Curvature(H.double()).damped(damp)
    out = torch.zeros_like(target, dtype=torch.float64)
    for i in range(target.shape[0]):
        keep = (~mask[i]).nonzero().flatten()
        rhs = (target[i].double() @ Hd)[keep]
        out[i, keep] = torch.linalg.solve(Hd[keep][:, keep], rhs)
    return out


def objective(X, target, Hd):
    delta = (X.double() - target.double())
    return ((delta @ Hd.double()) * delta).sum(1)  # (r,)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_refit_converges_to_the_exact_solve_on_the_support(pattern):
    X_in = realistic_inputs(512, 48, seed=1)
    H = hessian_of(X_in)
    W = torch.randn(24, 48, generator=torch.Generator().manual_seed(2))
    pruned = prune_weight(W, H, "thanos", pattern, 0.5 if pattern == "unstructured" else None, block_size=16,
                          refit_iterations=0, mask_search_iterations=0)
    refit = refit_on_support(pruned.weight, pruned.mask, W, Curvature(H).damped(0.01), iterations=200).weight
    exact = exact_support_solve(W, H, pruned.mask, 0.01)
    Hd = Curvature(H.double()).damped(0.01)
    eig = torch.linalg.eigvalsh(Hd)
    # CG in fp32 reaches the solution to round-off amplified by the condition number.
    tol = 50 * EPS * float(eig.max() / eig.min()) * float(exact.abs().max())
    assert (refit.double() - exact).abs().max() <= tol
    assert torch.equal(refit[pruned.mask], torch.zeros(int(pruned.mask.sum())))


def test_refit_stops_once_an_iteration_gains_less_than_the_tolerance():
    """The early stop ends where the tracked error says it should: the result is short of the full
    run's, by at most what the remaining iterations could gain (the tolerance per iteration)."""
    X_in = realistic_inputs(1024, 256, seed=5)
    H = hessian_of(X_in)
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    pruned = prune_weight(W, H, "thanos", "2:4", block_size=16, refit_iterations=0, mask_search_iterations=0)
    Hd = Curvature(H).damped(0.01)
    full = float(objective(refit_on_support(pruned.weight, pruned.mask, W, Hd, 60, tolerance=0).weight, W, Hd).sum())
    stopped = refit_on_support(pruned.weight, pruned.mask, W, Hd, 60, tolerance=1e-3).weight
    early = float(objective(stopped, W, Hd).sum())
    assert early > full  # it stopped before converging ...
    # ... close to the end: CG's gains shrink, so what is left is a few iterations' worth at most
    # (plus fp32 round-off of the objective over 256 columns)
    assert early <= full * (1 + 10 * 1e-3) + 256 * EPS * early
    assert_nm(stopped, 2, 4)


def test_refit_never_raises_the_objective_and_keeps_the_pattern():
    X_in = realistic_inputs(256, 64, seed=3)
    H = hessian_of(X_in)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    pruned = prune_weight(W, H, "thanos", "2:4", block_size=16, refit_iterations=0, mask_search_iterations=0)
    Hd = Curvature(H).damped(0.01)
    before = objective(pruned.weight, W, Hd)
    for iterations in (1, 3, 10):
        refit = refit_on_support(pruned.weight, pruned.mask, W, Hd, iterations).weight
        after = objective(refit, W, Hd)
        scale = 64 * EPS * objective(torch.zeros_like(W), W, Hd)  # round-off of one evaluation
        assert bool((after <= before + scale).all())
        assert_nm(refit, 2, 4)
    assert float(after.sum()) < float(before.sum())  # block-wise updates leave something to recover


def test_prune_weight_with_refit_reports_a_lower_error_and_the_same_mask():
    X_in = realistic_inputs(512, 64, seed=5)
    H = hessian_of(X_in)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    plain = prune_weight(W, H, PruneConfig("thanos", "2:4", block_size=16, refit_iterations=0,
                                           mask_search_iterations=0))
    refit = prune_weight(W, H, PruneConfig("thanos", "2:4", block_size=16, refit_iterations=20,
                                           mask_search_iterations=0))
    assert torch.equal(plain.mask, refit.mask)
    assert refit.error < plain.error
    assert refit.config.refit_iterations == 20


@pytest.mark.parametrize("method", ["thanos", "sparsegpt"])
def test_the_tracked_errors_equal_the_direct_sums(method):
    """The solver sums each removal's exact cost and the refit its line searches' decreases; the
    comparison after a search trusts both, so each must be the direct sum (w - t) Hd (w - t)^T, a
    never-active input's zeroed column included, to the round-off of fp32 products over c inputs
    and of the c x c factor the solver's updates use (the condition number's share)."""
    c = 128
    X_in = realistic_inputs(1024, c, seed=11)
    X_in[:, 9] = 0.0  # input 9 never active
    H = hessian_of(X_in)
    W = torch.randn(48, c, generator=torch.Generator().manual_seed(12))
    pruned = prune_weight(W, H, PruneConfig(method, "2:4", block_size=32, **(
        {"refit_iterations": 0, "mask_search_iterations": 0} if method == "thanos" else {})))
    Hd = Curvature(H).damped(pruned.damp_used)
    eig = torch.linalg.eigvalsh(Hd.double())
    tol = c * EPS * float(eig.max() / eig.min())
    curvature = Curvature(H)
    from thanos.recipe import Solve
    out = Solve(method, 32).run(W.clone(), H, pruned.config.pattern, 0.5, "layer", 2**20, None, curvature)
    assert torch.equal(out.weight, pruned.weight)
    direct = float(objective(out.weight, W, Hd).sum())
    assert float(W[:, 9].abs().sum()) > 0 and out.error == pytest.approx(direct, rel=tol)
    refit = refit_on_support(out.weight, out.mask, W, Hd, 10)
    assert refit.error == pytest.approx(float(objective(refit.weight, W, Hd).sum()), rel=tol)
    assert refit.error < out.error
