"""Smoothing before 8-bit quantization (thanos.smooth): same function, same zeros, narrower input ranges."""
import pytest
import torch

from tests.thanos.helpers import assert_nm
from tests.thanos.test_permute import EPS, _layer_setup
from thanos import PruneConfig
from thanos.driver import collect_statistics, prune_model_, run_layer
from thanos.linears import weight_view
from thanos.models import (LayerSelection, adapter_for, attention_heads, decoder_layers, free_channels, load_model,
                           prunable_linears, smoothing_groups)
from thanos.calibration import sample_windows, tokenize_split
from thanos.smooth import ALPHA_GRID, estimated_error, smooth_layer_, smoothing_scales
from tests.conftest import FAMILIES, VISION_LANGUAGE, _save_tiny
from tests.thanos.helpers import realistic_inputs


def test_scales_balance_the_two_ranges():
    act, weight = torch.tensor([100.0, 1.0, 0.0, 4.0]), torch.tensor([1.0, 1.0, 2.0, 0.0])
    scale = smoothing_scales(act, weight, 0.5)
    assert scale.tolist() == [10.0, 1.0, 1.0, 1.0]  # zero ranges leave their channel alone
    assert torch.allclose(act[:2] / scale[:2], weight[:2] * scale[:2])  # alpha 0.5: both ranges equal
    assert torch.equal(smoothing_scales(act, weight, 0.0)[:2], 1 / weight[:2])


@pytest.mark.parametrize("alpha", [0.5, 0.8, "auto"])
def test_smoothing_keeps_the_layer_output_every_zero_and_the_statistics(tiny_llama_dir, alpha):
    model, layer, linears, inputs, args, kwargs = _layer_setup(tiny_llama_dir)
    for mod in linears.values():  # a pruned layer: its zeros must stay where they are
        w = weight_view(mod)
        groups = w.reshape(w.shape[0], -1, 4)
        w.copy_(groups.scatter(-1, groups.abs().topk(2, -1, largest=False).indices, 0.0).reshape(w.shape))
    zeros = {name: weight_view(mod) == 0 for name, mod in linears.items()}
    with torch.no_grad():
        before = run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
        shared = collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu", track_ranges=True)
        hessians = {name: shared.hessian(name) for name in linears}
        reports = smooth_layer_(layer, "model.layers.0.", smoothing_groups(model), alpha, shared.channel_range,
                                shared.hessian, *attention_heads(model))
        after = run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
        again = collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu", track_ranges=True)
    assert set(reports) == set(linears)
    for name, mod in linears.items():
        assert torch.equal(weight_view(mod) == 0, zeros[name]), name
        assert_nm(weight_view(mod), 2, 4)
        # the rescaled statistics are the statistics of the smoothed inputs (fp32 round-off of c-long sums)
        H = again.hessian(name)
        assert (hessians[name] - H).abs().max() <= 8 * H.shape[0] * EPS * H.abs().max(), name
    # every weight and norm entry is rounded once more; the sums of the widest linear bound the change
    y0, y1 = torch.cat(before), torch.cat(after)
    assert (y0 - y1).abs().max() <= 16 * model.config.intermediate_size * EPS * y0.abs().max()
    for report in reports.values():
        assert report.input_spread_after <= report.input_spread_before
        if alpha == "auto":
            assert report.alpha in ALPHA_GRID and report.estimated_error_vs_unsmoothed <= 1.0


@pytest.mark.parametrize("family, overrides, smoothed", [
    *[(f, {}, {"down_proj", "o_proj"}) for f in ("gemma", "gemma2", "gemma3_text", "olmo2")],
    ("phi3", {}, {"qkv_proj", "gate_up_proj"}),
    ("opt", {}, {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    ("opt", dict(do_layer_norm_before=False, activation_function="gelu"), {"out_proj"}),  # OPT-350m's order
    ("gpt2", {}, {"c_attn", "c_fc"}),
    # StableLM 2 12B's parallel residual: one norm before attention and MLP, the other unused
    ("stablelm", dict(use_parallel_residual=True, qk_layernorm=True),
     {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj"})])
def test_other_families_smooth_where_a_fold_keeps_the_layer(family, overrides, smoothed, tmp_path_factory,
                                                            tiny_tokenizer_dir):
    """Gemma's norms scale by 1 + weight and OLMo 2's follow attention and MLP, so nothing folds into
    them; up_proj -> down_proj and v_proj -> o_proj (per head) need no norm, and keep the layer's
    output to round-off there too (Gemma's GELU gate, Gemma 2's norms after the MLP, OLMo 2's and
    Gemma 3's q/k norms included). Phi-3 fuses q/k/v and gate/up, whose norms fold as LLaMA's.
    OPT's and GPT-2's LayerNorms carry a bias, divided with the weight; OPT's fc1 -> fc2 passes
    ReLU (a GELU variant keeps it out) and OPT-350m's norms come after the linears."""
    model, layer, linears, inputs, args, kwargs = _layer_setup(_save_tiny(family, tmp_path_factory,
                                                                          tiny_tokenizer_dir, **overrides))
    _trained_like_norms_(layer)
    with torch.no_grad():
        before = run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
        shared = collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu", track_ranges=True)
        reports = smooth_layer_(layer, f"{adapter_for(model).layers}.0.", smoothing_groups(model), 0.5,
                                shared.channel_range, shared.hessian, *attention_heads(model))
        after = run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
    assert {name.rsplit(".", 1)[-1] for name in reports} == smoothed
    assert all(r.input_spread_after <= r.input_spread_before for r in reports.values())
    y0, y1 = torch.cat(before), torch.cat(after)
    widest = max(weight_view(m).shape[1] for m in linears.values())
    assert (y0 - y1).abs().max() <= 16 * widest * EPS * y0.abs().max()


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", *VISION_LANGUAGE, *sorted(FAMILIES)])
def test_what_the_adapter_declares_keeps_every_familys_layer(family, tmp_path_factory, tiny_tokenizer_dir):
    """What thanos.models.ADAPTERS declares of a family (channels free to reorder, producers an input's
    scale folds into) must hold for its real decoder layers: every free channel set a layer has
    reordered (by a search on made-up statistics, so that channels do move) and every group it has
    smoothed, the layer computes the same function. A wrong declaration changes the output at the
    first layer holding it; each declaration must be held by some layer (the tiny mixtures of
    experts have a dense layer and a layer of experts)."""
    from thanos.driver import capture_layer_inputs, layer_arguments
    from thanos.permute import ChannelLayout, permute_free_channels_
    from thanos.config import Pattern

    model, tokenizer = load_model(str(_save_tiny(family, tmp_path_factory, tiny_tokenizer_dir)))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 3, 32)
    inputs, _, _ = capture_layer_inputs(model, samples, "cpu", "cpu")
    linears_of = prunable_linears(model, LayerSelection())
    generator, made_up = torch.Generator().manual_seed(0), {}
    permuted, smoothed = set(), set()

    def hessian_of(name: str) -> torch.Tensor:
        if name not in made_up:
            made_up[name] = torch.diag(torch.rand(weight_view(linears[name]).shape[1], generator=generator) ** 4 + 1e-3)
        return made_up[name]

    for index, (layer, (args, kwargs)) in enumerate(zip(decoder_layers(model), layer_arguments(model, samples, "cpu"))):
        prefix, linears = f"{adapter_for(model).layers}.{index}.", linears_of[index]
        _trained_like_norms_(layer)
        with torch.no_grad():
            before = run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
            shared = collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu", track_ranges=True)
            reports = permute_free_channels_(layer, prefix, ChannelLayout.of(model, layer),
                                             lambda name: hessian_of(name) if name in linears else None,
                                             Pattern.parse("2:4"))
            groups = smooth_layer_(layer, prefix, smoothing_groups(model), 0.5, shared.channel_range, shared.hessian,
                                   *attention_heads(model, layer))
            after = run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
        assert all(r.moved > 0 for r in reports)
        permuted |= {r.consumer[len(prefix):] for r in reports}
        smoothed |= {r.producer[len(prefix):] for r in groups.values()}
        y0, y1 = torch.cat(before), torch.cat(after)
        widest = max(weight_view(m).shape[1] for m in linears.values())
        assert (y0 - y1).abs().max() <= 16 * widest * EPS * y0.abs().max(), index
        inputs = before
    assert permuted == {spec.consumer for spec in free_channels(model)}
    assert smoothed == {group.producer for group in smoothing_groups(model)}


def _trained_like_norms_(layer: torch.nn.Module) -> None:
    """A fresh norm is weight 1 (Gemma's 0), bias 0: give it what a trained one has, so that folding a
    scale into its weight and bias is checked."""
    for norm in (m for m in layer.modules() if "norm" in type(m).__name__.lower()):
        if getattr(norm, "weight", None) is not None:
            norm.weight.data.uniform_(0.5, 2.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data.normal_(0.0, 0.1)


def _int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x / scale).clamp(-127, 127) * scale


@pytest.mark.parametrize("outliers", [0, 4])
def test_estimated_error_follows_the_real_int8_error(outliers):
    """The noise model against real INT8 rounding of a pruned layer's inputs and weights, at every strength."""
    X = realistic_inputs(4096, 256, outliers=outliers, scale=30.0).double()
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W[W.abs() < W.abs().median()] = 0  # half the weights pruned
    amax, moment = X.abs().amax(0), (X * X).mean(0)
    real, estimate = {}, {}
    for alpha in (0.0, 0.25, 0.5, 0.75, 0.95):
        s = smoothing_scales(amax, W.abs().amax(0), alpha).double()
        xs, ws = X / s, W * s
        xq = _int8(xs, xs.abs().max() / 127)
        wq = _int8(ws, (ws.abs().amax(1, keepdim=True) / 127).clamp(min=1e-30))
        real[alpha] = float(((xq @ wq.T - X @ W.T) ** 2).sum())
        estimate[alpha] = estimated_error([W], amax, moment, s, 127.0) * X.shape[0]
        assert 0.5 * real[alpha] <= estimate[alpha] <= 2 * real[alpha], (alpha, real[alpha], estimate[alpha])
    best = min(estimate, key=estimate.get)
    assert real[best] <= 1.25 * min(real.values())  # what the estimate picks is (nearly) the real best


@pytest.mark.parametrize("fixture, unsmoothed", [("tiny_llama_dir", set()), ("tiny_opt_dir", set()),
                                                 ("tiny_gpt2_dir", {"attn.c_proj", "mlp.c_proj"})])
def test_whole_model_int8_smooths_by_default_and_records_it(request, fixture, unsmoothed):
    model, tokenizer = load_model(str(request.getfixturevalue(fixture)))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    config = PruneConfig(quantize="int8")
    assert config.recipe.steps[-1].smoothing == "auto" and PruneConfig(quantize="fp8").quantize_smoothing == 0.0
    reports = prune_model_(model, samples, config, "cpu")
    for r in reports:
        smoothing = r["quantization"].get("smoothing")
        if any(r["name"].endswith(name) for name in unsmoothed):
            assert smoothing is None, r["name"]
        else:
            assert smoothing["alpha"] in ALPHA_GRID, r["name"]
    for layer in prunable_linears(model, LayerSelection()).values():
        for mod in layer.values():
            assert_nm(weight_view(mod), 2, 4)


def test_channel_ranges_move_with_the_permuted_channels(tiny_llama_dir):
    from thanos.config import Pattern
    from thanos.permute import ChannelLayout, permute_free_channels_

    model, layer, linears, inputs, args, kwargs = _layer_setup(tiny_llama_dir)
    with torch.no_grad():
        shared = collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu", track_ranges=True)
        moved = permute_free_channels_(layer, "model.layers.0.", ChannelLayout.of(model), shared.own_hessian,
                                       Pattern.parse("2:4"), shared.own_range)
        again = collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu", track_ranges=True)
    assert {r.consumer.rsplit(".", 1)[-1] for r in moved} == {"o_proj", "down_proj"}
    for name in linears:
        before, after = shared.channel_range(name), again.channel_range(name)
        if name.endswith("o_proj"):  # a moved channel's largest value is the same value
            assert torch.equal(before, after), name
        else:  # downstream of o_proj, whose sums now run in another order: fp32 round-off, not a shuffle
            assert (before - after).abs().max() <= 8 * model.config.intermediate_size * EPS * before.max(), name


def test_auto_strength_is_for_int8_only_and_the_cli_takes_it(tmp_path):
    from click.testing import CliRunner

    from cli import main
    from thanos.pattern import ConfigError

    assert PruneConfig(quantize="int8", quantize_smoothing="auto").recipe.steps[-1].smoothing == "auto"
    with pytest.raises(ConfigError, match="grid is relative to each value"):
        PruneConfig(quantize="fp8", quantize_smoothing="auto")
    refused = CliRunner().invoke(main, ["prune", "--quantize", "int8", "--quantize-smoothing", "most",
                                        "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "neither a strength in [0, 1] nor 'auto'" in refused.output, refused.output
