"""8-bit quantization of pruned weights (thanos.quantize): grids, scales, compensation, bit-exact storage."""
import pytest
import torch

from tests.thanos.helpers import assert_nm, damped, layer_problem
from thanos.api import prune_weight
from thanos.config import PruneConfig
from thanos.hessian import reconstruction_error
from thanos.quantize import (FORMATS, compensated, dequantize, fake_quantize, grid_of, quantize_weight, token_scales,
                             round_to_nearest, to_grid, weight_scales)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pruned_problem(seed: int = 0, rows: int = 32, cols: int = 128):
    W, H = layer_problem(4 * cols, rows, cols, seed)
    return prune_weight(W, H, preset="fast").weight, H


def test_int8_grid_is_the_symmetric_integers():
    x = torch.tensor([-300.0, -127.4, -0.5, 0.5, 1.5, 2.5, 126.6, 500.0])
    assert to_grid(x, FORMATS["int8"]).tolist() == [-127, -127, -0, 0, 2, 2, 127, 127]  # ties to even


def test_fp8_grid_is_e4m3_and_saturates_at_448():
    x = torch.linspace(-600, 600, 2001)
    grid = to_grid(x, FORMATS["fp8"])
    assert grid.abs().max() == 448
    assert torch.equal(grid.to(torch.float8_e4m3fn).float(), grid)  # every value is an E4M3 value
    # nearest: no E4M3 value lies closer to x than the one chosen (inside the range)
    inside = x.abs() <= 448
    below, above = grid[inside] <= x[inside], grid[inside] >= x[inside]
    assert (below | above).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stored_weights_are_exactly_their_8bit_values_times_the_scales(fmt, dtype):
    W, H = _pruned_problem()
    W = W.to(dtype)
    scale = weight_scales(W, FORMATS[fmt], dtype)
    assert torch.equal(scale.to(dtype).float(), scale)  # each scale is representable in the storage dtype
    grid = round_to_nearest(W, scale, FORMATS[fmt])
    stored = dequantize(grid, scale, dtype)
    assert stored.dtype == dtype
    assert not stored[W == 0].any()  # every pruned zero stays (a tiny kept weight may round to zero too)
    recovered = grid_of(stored, scale, FORMATS[fmt])
    assert recovered is not None and recovered.dtype == FORMATS[fmt].dtype
    assert torch.equal(recovered.float(), grid)
    tampered = stored.clone()
    tampered[0, (stored[0] != 0).nonzero()[0, 0]] *= 1.01
    assert grid_of(tampered, scale, FORMATS[fmt]) is None


def test_compensation_with_uncorrelated_inputs_is_round_to_nearest():
    # With a diagonal Hessian no column's error can be offset by another: the oracle is rounding.
    W, _ = _pruned_problem()
    H = torch.diag(torch.rand(W.shape[1]) + 0.5)
    for fmt in FORMATS.values():
        scale = weight_scales(W, fmt, torch.float32)
        assert torch.equal(compensated(W, H, scale, fmt, damp=0.01), round_to_nearest(W, scale, fmt))


def test_compensation_of_two_columns_is_the_least_squares_update():
    # Quantize column 0, then column 1 is moved to the minimiser of the damped quadratic error
    # given column 0 fixed: w1 + (w0 - q0) H01 / H11; then rounded.
    torch.manual_seed(0)
    W = torch.randn(64, 2)
    X = torch.randn(256, 2) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    H = X.T @ X / X.shape[0]
    fmt = FORMATS["int8"]
    scale = weight_scales(W, fmt, torch.float32) * 8  # a coarse grid, so the update changes roundings
    Hd = damped(H, 0.01)
    g0 = to_grid(W[:, 0] / scale, fmt)
    moved = W[:, 1] + (W[:, 0] - g0 * scale) * Hd[0, 1] / Hd[1, 1]
    expected = torch.stack([g0, to_grid(moved / scale, fmt)], dim=1)
    got = compensated(W, H, scale, fmt, damp=0.01)
    # ties aside (none at this seed), rounding the fp32 update gives the same grid values
    assert torch.equal(got, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compensation_keeps_the_pattern_and_beats_rounding(fmt):
    for seed in range(3):
        W, H = _pruned_problem(seed)
        scale = weight_scales(W, FORMATS[fmt], torch.float32)
        grid = compensated(W, H, scale, FORMATS[fmt], damp=0.01)
        assert not grid[W == 0].any()  # never writes a pruned position
        assert_nm(grid, 2, 4)
        near = dequantize(round_to_nearest(W, scale, FORMATS[fmt]), scale, torch.float32)
        comp = dequantize(grid, scale, torch.float32)
        # on correlated inputs the compensation lowers the layer's output error
        assert reconstruction_error(W, comp, H) < reconstruction_error(W, near, H)


@pytest.mark.parametrize("rounding", ["compensated", "nearest"])
def test_quantize_weight_never_ends_worse_than_rounding(rounding):
    W, H = _pruned_problem(1)
    result = quantize_weight(W, H, FORMATS["fp8"], rounding)
    assert result.report.error <= result.report.nearest_error
    assert result.report.rounding == ("compensated" if rounding == "compensated" else "nearest")
    # the same error computed two ways in fp32: round-off of sums over the 128 inputs
    assert result.report.error == pytest.approx(reconstruction_error(W, result.weight, H),
                                                rel=128 * torch.finfo(torch.float32).eps)
    assert grid_of(result.weight, result.scale, FORMATS["fp8"]) is not None


def test_prune_weight_with_the_8bit_step_returns_the_quantized_weight():
    W, H = layer_problem(512, 32, 128, 0)
    plain = prune_weight(W, H, PruneConfig(preset="fast"))
    quantized = prune_weight(W, H, PruneConfig(preset="fast", quantize="int8"))
    assert plain.scale is None and plain.quantization is None
    assert torch.equal(quantized.mask, plain.mask)
    assert grid_of(quantized.weight, quantized.scale, FORMATS["int8"]) is not None
    assert_nm(quantized.weight, 2, 4)
    # the reported error is the quantized weight's, against the dense one: the damped sums it comes from,
    # the damping taken back out, to the round-off of fp32 products over c inputs
    from thanos.api import quadratic_error

    direct = reconstruction_error(W, quantized.weight, H)
    Hd = damped(H, 0.01)
    zero = torch.zeros_like(W)
    amplification = max(quadratic_error(quantized.weight, W, Hd) / quadratic_error(quantized.weight, W, H),
                        quadratic_error(zero, W, Hd) / quadratic_error(zero, W, H))
    c = W.shape[1]
    assert quantized.error == pytest.approx(direct, rel=c * c * torch.finfo(torch.float32).eps * amplification)


def test_fake_quantize_is_idempotent_and_on_the_grid():
    x = torch.randn(4, 16) * 3
    for fmt in FORMATS.values():
        scale = float(x.abs().max()) / fmt.qmax
        once = fake_quantize(x, scale, fmt)
        assert torch.equal(fake_quantize(once, scale, fmt), once)
        assert torch.equal(to_grid(once / scale, fmt) * scale, once)


def test_per_token_scales_put_each_tokens_largest_magnitude_on_the_grids_largest_value():
    x = torch.randn(5, 16) * torch.tensor([1.0, 1e-3, 1e3, 0.0, 7.0])[:, None]
    for fmt in FORMATS.values():
        scales = token_scales(x, fmt)
        assert scales.shape == (5, 1) and scales[3, 0] == 1.0  # a token of zeros keeps scale 1
        rounded = fake_quantize(x, scales, fmt)
        live = [0, 1, 2, 4]
        assert torch.equal(rounded[live].abs().amax(-1), x[live].abs().amax(-1))  # the largest is exact
        assert torch.equal(rounded[3], x[3])
        assert torch.equal(fake_quantize(rounded, token_scales(rounded, fmt), fmt), rounded)  # idempotent
