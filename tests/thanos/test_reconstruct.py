"""Decoder-block reconstruction: masks frozen, the layer's output error never goes up."""
import copy
import math

import pytest
import torch

from thanos import PruneConfig
from thanos.calibration import sample_windows, tokenize_split
from thanos.driver import capture_layer_inputs, prune_model_, run_layer
from thanos.models import LayerSelection, load_model, prunable_linears
from thanos.linears import weight_view
from thanos.reconstruct import reconstruct_layer_
from tests.thanos.helpers import assert_nm


def _magnitude_2of4_(weight):
    w = weight.data  # (out, in)
    groups = w.abs().reshape(w.shape[0], -1, 4)
    drop = groups.argsort(-1)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(w.shape)
    w.masked_fill_(mask, 0.0)
    return mask


def _layer_setup(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 6, 32)
    inputs, args, kwargs = capture_layer_inputs(model, samples, "cpu", "cpu")
    layer = model.model.layers[0]
    with torch.no_grad():
        targets = run_layer(copy.deepcopy(layer), inputs, args, kwargs, "cpu", "cpu")
    linears = prunable_linears(model, LayerSelection())[0]
    masks = {name: _magnitude_2of4_(mod.weight) for name, mod in linears.items()}

    def forward(x):
        y = layer(x, *args, **kwargs)
        return y[0] if isinstance(y, tuple) else y

    return layer, linears, masks, inputs, targets, forward


def test_reconstruction_lowers_the_error_and_keeps_every_mask(tiny_llama_dir):
    layer, linears, masks, inputs, targets, forward = _layer_setup(tiny_llama_dir)
    norms = {n: p.detach().clone() for n, p in layer.named_parameters() if "proj" not in n}
    result = reconstruct_layer_(layer, [m.weight for m in linears.values()], inputs, targets, forward, epochs=3, lr=1e-3)
    assert result.kept and result.loss_after < result.loss_before
    for name, mod in linears.items():
        assert torch.equal(mod.weight[masks[name]], torch.zeros(int(masks[name].sum())))
        assert_nm(mod.weight, 2, 4)
        assert not mod.weight.requires_grad and mod.weight.grad is None
    for n, p in layer.named_parameters():  # only the pruned linears' weights move
        if n in norms:
            assert torch.equal(p, norms[n]) and p.requires_grad


def test_reconstruction_that_does_not_help_is_discarded(tiny_llama_dir):
    layer, linears, masks, inputs, targets, forward = _layer_setup(tiny_llama_dir)
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    result = reconstruct_layer_(layer, [m.weight for m in linears.values()], inputs, targets, forward, epochs=1, lr=10.0)
    assert not result.kept and result.loss_after == result.loss_before
    assert all(torch.equal(m.weight, before[n]) for n, m in linears.items())


def test_driver_reconstructs_each_layer_and_reports_it(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    config = PruneConfig(pattern="2:4", reconstruct_epochs=2, reconstruct_lr=1e-3)
    assert PruneConfig(preset="best").reconstruct_epochs > 0 and PruneConfig(method="sparsegpt").reconstruct_epochs == 0
    reports = prune_model_(model, samples, config)
    for name, mod in prunable_linears(model, LayerSelection())[0].items():
        assert_nm(weight_view(mod), 2, 4)
    steps = [r["reconstruction"] for r in reports]
    assert all(s["loss_after"] <= s["loss_before"] for s in steps)
    assert any(s["kept"] and s["loss_after"] < s["loss_before"] for s in steps)


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def half_llama_dir(request, tmp_path_factory, tiny_llama_dir):
    """The tiny llama as GPU users' checkpoints come: saved in half precision, loaded as such (dtype auto)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=request.param).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path, request.param


@pytest.mark.parametrize("preset", ["fast", "default", "best"])
def test_half_precision_models_prune_to_finite_exact_weights_in_their_dtype(half_llama_dir, tmp_path, preset):
    from transformers import AutoModelForCausalLM

    from thanos.pipeline import PruneJob, prune_to_directory

    path, dtype = half_llama_dir
    report = prune_to_directory(PruneJob(out=str(tmp_path / "p"), model=str(path), config=PruneConfig(preset=preset),
                                         calib_samples=8, seqlen=32, evaluate=False, device="cpu"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    for layer in prunable_linears(model, LayerSelection()).values():
        for mod in layer.values():
            assert_nm(weight_view(mod), 2, 4)
    assert all(r["error"] is not None and math.isfinite(r["error"]) for r in report["layers"])
    if preset == "best":
        # fp16 Adam would divide 0 by 0 at every pruned position and the step would be discarded.
        steps = {r["name"].rsplit(".", 2)[0]: r["reconstruction"] for r in report["layers"]}
        assert all(s["kept"] and s["loss_after"] < s["loss_before"] for s in steps.values()), steps


def test_the_reconstruction_reduces_on_the_layers_device(tiny_llama_dir):
    """NCCL reduces only GPU tensors: every tensor handed to the collective lives where the layer does."""
    layer, linears, masks, inputs, targets, forward = _layer_setup(tiny_llama_dir)
    seen = []
    reconstruct_layer_(layer, [m.weight for m in linears.values()], inputs, targets, forward, epochs=1, lr=1e-3,
                       all_reduce=lambda t: seen.append((t.device, t.dtype)))
    device = next(iter(linears.values())).weight.device
    assert seen and all(d == device for d, _ in seen)
    assert {t for _, t in seen} == {torch.float64}  # fp64 sums: the same in any grouping of samples


def _rounded_setup(tiny_llama_dir):
    """Layer 0 with 2:4 weights, and each linear's static FP8 input scale from a pass over it."""
    from thanos.driver import InputRanges
    from thanos.quantize import FORMATS, activation_scale

    layer, linears, masks, inputs, targets, forward = _layer_setup(tiny_llama_dir)
    ranges = InputRanges(linears)
    with torch.no_grad(), ranges:
        for x in inputs:
            forward(x)
    scales = {name: activation_scale(float(ranges.amax[name]), FORMATS["fp8"]) for name in linears}
    return layer, linears, masks, inputs, targets, forward, scales


def test_rounded_8bit_computes_the_8bit_layer_with_gradients_straight_through(tiny_llama_dir):
    """Within `rounded_8bit` the layer computes what the 8-bit runtime does (weights rounded to nearest
    per row, inputs by their static scales: the simulation the evaluation uses), while the gradient
    reaches the unrounded weights, which stay the layer's parameters and are not changed by it."""
    from thanos.quantize import FORMATS, dequantize, round_to_nearest, weight_scales
    from thanos.quantized_model import ATTRIBUTE, LinearQuantization, inputs_rounded, set_quantization
    from thanos.reconstruct import rounded_8bit

    layer, linears, masks, inputs, targets, forward, scales = _rounded_setup(tiny_llama_dir)
    fmt = FORMATS["fp8"]
    params = {name: mod.weight for name, mod in linears.items()}
    before = {name: w.detach().clone() for name, w in params.items()}
    with rounded_8bit(linears, fmt, scales, torch.float32):
        with torch.no_grad():
            out = forward(inputs[0])
        with torch.enable_grad():
            for w in params.values():
                w.requires_grad_(True)
            forward(inputs[0]).pow(2).sum().backward()
    grads = {name: w.grad for name, w in params.items()}
    for w in params.values():
        w.requires_grad_(False)
        w.grad = None
    assert all(linears[name].weight is w and torch.equal(w, before[name]) for name, w in params.items())
    assert all(g is not None and bool((g[~masks[name]] != 0).any()) for name, g in grads.items())
    with torch.no_grad():
        for name, mod in linears.items():  # the 8-bit layer as the evaluation simulates it
            scale = weight_scales(mod.weight, fmt, torch.float32)
            mod.weight.copy_(dequantize(round_to_nearest(mod.weight, scale, fmt), scale, torch.float32))
            set_quantization(mod, LinearQuantization("fp8", scale, torch.tensor(scales[name])))
        with inputs_rounded(linears.values()):
            expected = forward(inputs[0])
        for name, mod in linears.items():
            mod.weight.copy_(before[name])
            delattr(mod, ATTRIBUTE)
        unrounded = forward(inputs[0])
    # The same products on the same values; only the straight-through sums (x + (r - x)) may round.
    tolerance = 64 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert float((out - expected).abs().max()) <= tolerance
    assert float((out - unrounded).abs().max()) > tolerance  # the rounding is really there

def test_reconstruction_through_the_rounding_tunes_the_8bit_layer(tiny_llama_dir):
    """Reconstructed within `rounded_8bit`, the error measured is the 8-bit layer's, it goes down,
    and every mask holds."""
    from thanos.quantize import FORMATS
    from thanos.reconstruct import rounded_8bit

    layer, linears, masks, inputs, targets, forward, scales = _rounded_setup(tiny_llama_dir)
    plain = copy.deepcopy(layer)
    weights = [m.weight for m in linears.values()]  # the parameters: within, `weight` is the rounded tensor
    with rounded_8bit(linears, FORMATS["fp8"], scales, torch.float32):
        result = reconstruct_layer_(layer, weights, inputs, targets, forward, epochs=2, lr=1e-3)
    assert result.kept and result.loss_after < result.loss_before
    for name, mod in linears.items():
        assert torch.equal(mod.weight[masks[name]], torch.zeros(int(masks[name].sum())))
        assert not mod.weight.requires_grad and mod.weight.grad is None
    assert not any(n.startswith("parametrizations") or "original" in n for n, _ in layer.named_parameters())
    assert {n for n, _ in layer.named_parameters()} == {n for n, _ in plain.named_parameters()}


def test_best_with_fp8_reconstructs_through_the_rounding(tiny_llama_dir):
    """The driver tunes `best`'s layers through FP8's rounding (what the loss it reports measures), and
    the 8-bit step after it still leaves every weight its 8-bit values times its scale, 2:4 exact."""
    from thanos.quantize import FORMATS, grid_of
    from thanos.quantized_model import quantization_of

    losses = {}
    for quantized in (True, False):
        model, tokenizer = load_model(str(tiny_llama_dir))
        samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
        config = PruneConfig(preset="best", quantize="fp8", reconstruct_epochs=1, reconstruct_quantized=quantized)
        reports = prune_model_(model, samples, config)
        losses[quantized] = reports[0]["reconstruction"]["loss_before"]
        for mod in prunable_linears(model, LayerSelection())[0].values():
            assert_nm(weight_view(mod), 2, 4)
            assert grid_of(mod.weight, quantization_of(mod).weight_scale, FORMATS["fp8"]) is not None
    # layer 0's solves are the same; its reconstruction measured the 8-bit layer only when asked
    assert losses[True] != losses[False]
