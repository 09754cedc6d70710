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

    def forward(x, sample):  # the sample's index: arguments the same for every sample here
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
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype="auto")  # transformers 4.x would load fp32
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
