import pytest
import torch

from thanos import HessianAccumulator, hessian
from thanos.hessian import Curvature, inverse_upper_factor, reconstruction_error
from tests.thanos.helpers import damped, realistic_inputs


@pytest.mark.parametrize("columns", [16, 2 * hessian.ROW_BLOCK + 37])  # one row block, and three
def test_accumulator_streams_the_mean_of_xxT(columns):
    X = torch.randn(3, 50, columns, dtype=torch.float64)
    acc = HessianAccumulator(columns)
    for batch in X.split(1):  # three batches of (1, 50, c), in bf16 to show any dtype works
        acc.add(batch.to(torch.bfloat16))
    flat = X.reshape(-1, columns).to(torch.bfloat16).double()
    expected = flat.T @ flat / flat.shape[0]
    assert acc.tokens == 150
    H = acc.hessian
    assert torch.equal(H, H.T)  # the upper triangle mirrored
    # each fp32 product sums 50 terms: fp32 round-off of |x_i| |x_j| summed, and the mean's rounding
    magnitudes = flat.abs().T @ flat.abs() / flat.shape[0]
    eps = torch.finfo(torch.float32).eps
    assert ((H.double() - expected).abs() <= 50 * eps * magnitudes + eps * expected.abs()).all()


def test_statistics_cannot_grow_after_they_are_read():
    acc = HessianAccumulator(8)
    acc.add(torch.randn(20, 8))
    acc.hessian
    with pytest.raises(RuntimeError, match="already read"):
        acc.add(torch.randn(20, 8))


def test_samples_summed_in_any_grouping_give_the_same_hessian_bit_for_bit():
    """What makes N ranks read one process's Hessian: per-sample products, summed in fp64."""
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(64, 24, generator=g) * torch.logspace(-2, 2, 24) for _ in range(12)]
    one = HessianAccumulator(24)
    for x in samples:
        one.add(x)
    shards = [HessianAccumulator(24) for _ in range(3)]
    for i, x in enumerate(samples):
        shards[i * 3 // len(samples)].add(x)  # contiguous shards, as `Parallel.shard` deals them
    for shard in shards[1:]:  # what the all-reduce does (thanos.parallel.Parallel.reduce_stats_)
        shards[0].sum += shard.sum
        shards[0].tokens += shard.tokens
    assert torch.equal(shards[0].hessian, one.hessian)


def test_inverse_factor_is_inverse_of_damped_hessian():
    X = torch.randn(100, 12, dtype=torch.float64)
    H = (X.T @ X / 100).float()
    fac = inverse_upper_factor(H, 0.01)
    U = fac.upper.double()
    eig = torch.linalg.eigvalsh(damped(H.double(), 0.01))
    # an fp32 factor: round-off of its 12-term sums, amplified by the damped Hessian's condition number
    bound = 12 * torch.finfo(torch.float32).eps * float(eig[-1] / eig[0])
    assert (U.T @ U @ damped(H.double(), 0.01) - torch.eye(12, dtype=torch.float64)).abs().max() <= bound
    assert torch.equal(U, torch.triu(U))
    assert fac.escalations == 0


def test_reconstruction_error_matches_direct_computation():
    X = torch.randn(64, 10)
    W = torch.randn(5, 10)
    W2 = W.clone()
    W2[:, :3] = 0
    direct = ((W2 - W) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum()
    # both in fp32: the round-off of sums over 64 tokens and 10 inputs, in the numerator and the denominator
    bound = 2 * (64 + 10) * torch.finfo(torch.float32).eps * float(direct)
    assert abs(reconstruction_error(W, W2, X.T @ X / 64) - float(direct)) <= bound


@pytest.mark.parametrize("tokens", [48, 512])  # rank-deficient (the damping matters) and full rank
def test_quadratic_through_the_factor_is_the_undamped_sum(tokens):
    """What the 8-bit step measures its errors with: one triangular solve with the damped factor,
    the damping and the never-active inputs' unit diagonal taken back out."""
    cols = 96
    X = realistic_inputs(tokens, cols, seed=1)
    X[:, [3, 50]] = 0  # two inputs no token reaches
    H = X.T @ X / tokens
    delta = torch.randn(40, cols, generator=torch.Generator().manual_seed(2))
    curvature = Curvature(H)
    got = curvature.quadratic(delta, 0.01)
    H64, d64 = H.double(), delta.double()
    exact = float(((d64 @ H64) * d64).sum())
    # fp32 round-off: a triangular solve's forward error (c eps cond(U), cond(U) = sqrt(cond(Hd)))
    # relative to the damped sum, which the damping's removal then compares with the smaller undamped one
    Hd = damped(curvature.fixed().double(), curvature.factor(0.01).damp_used)
    eig = torch.linalg.eigvalsh(Hd)
    damped_sum = float(((d64 @ Hd) * d64).sum())
    bound = cols * torch.finfo(torch.float32).eps * float(eig[-1] / eig[0]) ** 0.5 * damped_sum
    assert abs(got - exact) <= bound
    assert curvature.quadratic(torch.zeros(3, cols), 0.01) == 0.0


@pytest.mark.parametrize("n", [5, 37, 64])
def test_lower_triangular_inverse_by_halves(monkeypatch, n):
    monkeypatch.setattr(hessian, "TRIANGULAR_INVERSE_BASE", 8)  # recurse even on small inputs
    X = torch.randn(n, 2 * n, dtype=torch.float64)
    L = torch.linalg.cholesky(X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64))
    inverse = hessian.lower_triangular_inverse(L)
    assert torch.equal(inverse, torch.tril(inverse))
    singular = torch.linalg.svdvals(L)  # fp64 round-off of n-term sums, amplified by L's condition number
    bound = n * torch.finfo(torch.float64).eps * float(singular[0] / singular[-1])
    assert (inverse @ L - torch.eye(n, dtype=torch.float64)).abs().max() <= bound


@pytest.mark.gpu
def test_on_a_gpu_the_blocks_of_the_upper_triangle_sum_to_the_cpus_hessian():
    """Fewer, larger row blocks on a GPU (`hessian.GPU_BLOCKS`): the same mean of x x^T, symmetric."""
    columns = hessian.GPU_BLOCKS * hessian.ROW_BLOCK + 100  # more than GPU_BLOCKS blocks of ROW_BLOCK rows
    samples = [torch.randn(40, columns) for _ in range(3)]
    on_cpu, on_gpu = HessianAccumulator(columns), HessianAccumulator(columns, "cuda")
    for x in samples:
        on_cpu.add(x)
        on_gpu.add(x.cuda())
    H = on_gpu.hessian.cpu()
    assert torch.equal(H, H.T)
    flat = torch.cat(samples).double()
    magnitudes = flat.abs().T @ flat.abs() / flat.shape[0]
    eps = torch.finfo(torch.float32).eps  # each product sums 40 terms in fp32, on either device
    assert ((H.double() - on_cpu.hessian.double()).abs() <= 2 * 40 * eps * magnitudes).all()
