"""Sequential solves within a decoder layer: each group of linears on the inputs the pruned layer gives it."""
import pytest
import torch

import thanos.driver as driver
from thanos import PruneConfig
from thanos.calibration import sample_windows, tokenize_split
from thanos.models import LayerSelection, load_model, prunable_linears
from thanos.quantized_model import inputs_rounded, quantization_of
from thanos.recipe import Recipe
from tests.thanos.helpers import assert_nm

GROUPS = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def solved_hessians(monkeypatch, tiny_llama_dir, config):
    """Prune the tiny llama with `config`, recording the Hessian each linear of layer 0 was solved on."""
    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    inputs, args, kwargs = driver.capture_layer_inputs(model, samples, torch.device("cpu"), torch.device("cpu"))
    seen = {}
    solve = driver.prune_weight

    def recording(W, H, *args, name=None, **kwargs):
        seen[name] = H.clone()
        return solve(W, H, *args, name=name, **kwargs)

    monkeypatch.setattr(driver, "prune_weight", recording)
    reports = driver.prune_model_(model, samples, config, "cpu")
    return model, (inputs, args, kwargs), seen, reports


def layer_hessians(layer, linears, captured, rounded=()):
    """Each linear's Hessian on layer 0 as it is now (with `rounded` linears' inputs rounded)."""
    inputs, args, kwargs = captured
    with inputs_rounded(rounded):
        shared = driver.collect_statistics(layer, linears, inputs, args, kwargs, "cpu", "cpu")
    return {name: shared.hessian(name) for name in linears}


@pytest.mark.parametrize("sequential", [True, False])
def test_each_group_is_solved_on_the_inputs_the_pruned_layer_gives_it(tiny_llama_dir, monkeypatch, sequential):
    """Sequential: every linear of layer 0 was solved on its input's statistics through the final
    pruned layer (q/k/v's as the dense layer's: nothing before them changes). Without it, o_proj,
    gate/up and down_proj were solved on the dense layer's, which the pruned layer no longer gives.
    Both passes run in this process at one thread count, so equal statistics are equal bits."""
    model, captured, seen, reports = solved_hessians(monkeypatch, tiny_llama_dir,
                                                     PruneConfig(preset="fast", sequential=sequential))
    linears = prunable_linears(model, LayerSelection())[0]
    now = layer_hessians(model.model.layers[0], linears, captured)
    short = {name.rsplit(".", 1)[-1]: name for name in linears}
    for group in GROUPS:
        for name in (short[s] for s in group):
            same = torch.equal(seen[name], now[name])
            assert same if sequential or group == GROUPS[0] else not same, name
    for weight in (mod.weight for layer in prunable_linears(model, LayerSelection()).values()
                   for mod in layer.values()):
        assert_nm(weight, 2, 4)
    assert reports[0]["name"].endswith("q_proj") and len(reports) == 7 * len(model.model.layers)


def test_sequential_8bit_quantizes_each_group_before_the_next_ones_statistics(tiny_llama_dir, monkeypatch):
    """With FP8 (no smoothing) and nothing after the solves, each group is quantized once solved and
    the later groups' statistics see its 8-bit weights and rounded inputs, as the runtime computes
    them (each linear's own input unrounded, as without the option); the input scales the final
    pass keeps are those of that same pass."""
    config = PruneConfig(preset="fast", sequential=True, quantize="fp8")
    model, captured, seen, reports = solved_hessians(monkeypatch, tiny_llama_dir, config)
    layer = model.model.layers[0]
    linears = prunable_linears(model, LayerSelection())[0]
    short = {name.rsplit(".", 1)[-1]: name for name in linears}
    earlier = []
    for group in GROUPS:
        names = [short[s] for s in group]
        now = layer_hessians(layer, {n: linears[n] for n in names}, captured, rounded=earlier)
        assert all(torch.equal(seen[n], now[n]) for n in names), group
        earlier += [linears[n] for n in names]
    down = short["down_proj"]
    assert not torch.equal(seen[down], layer_hessians(layer, {down: linears[down]}, captured)[down])
    inputs, args, kwargs = captured
    ranges = driver.InputRanges(linears)
    with torch.no_grad(), ranges, inputs_rounded(linears.values()):  # ranges first: each sees its own input unrounded
        driver.run_layer(layer, inputs, args, kwargs, "cpu", "cpu")
    for name, report in zip(linears, reports):
        assert report["quantization"]["input_amax"] == float(ranges.amax[name]), name
        stored = quantization_of(linears[name]).input_scale  # float32, as the report's scale is stored
        assert torch.equal(stored, torch.tensor(report["quantization"]["input_scale"], dtype=torch.float32))


@pytest.mark.parametrize("options", [dict(quantize="int8"), dict(quantize="fp8", reconstruct_epochs=1)],
                         ids=["smoothed int8", "fp8 after a reconstruction"])
def test_sequential_solves_with_the_8bit_step_at_the_layers_end(tiny_llama_dir, monkeypatch, options):
    """Where smoothing (rescaling v_proj's and up_proj's rows) or a reconstruction comes after the
    solves, the groups are solved in order on pruned, unquantized inputs and quantized at the end:
    the pattern stays exact and every weight finite."""
    config = PruneConfig(preset="fast", sequential=True, **options)
    assert not driver.quantizes_per_group(config, ("smoothing groups",) if "int8" in options.values() else ())
    model, captured, seen, reports = solved_hessians(monkeypatch, tiny_llama_dir, config)
    linears = {name: mod for layer in prunable_linears(model, LayerSelection()).values() for name, mod in layer.items()}
    for mod in linears.values():
        assert_nm(mod.weight, 2, 4)
        assert torch.isfinite(mod.weight).all() and quantization_of(mod).input_scale is not None
    assert all("input_scale" in r["quantization"] for r in reports)
    assert set(seen) == set(linears)


def test_the_recipe_records_the_option_and_old_recipes_read_as_one_pass():
    config = PruneConfig(preset="default", sequential=True)
    data = config.recipe.to_json()
    assert data["steps"][1] == {**data["steps"][1], "step": "solve", "sequential": True}
    assert PruneConfig.from_recipe(data).recipe == config.recipe
    del data["steps"][1]["sequential"]  # as reports written before the option have it
    assert Recipe.from_json(data).solve.sequential is False
    assert PruneConfig(method="sparsegpt", sequential=True).recipe.solve.sequential


def test_the_default_preset_solves_group_by_group_with_the_8bit_step_only():
    assert not PruneConfig().sequential and PruneConfig(quantize="fp8").sequential
    assert PruneConfig(quantize="int8").recipe.solve.sequential
    assert not PruneConfig(quantize="fp8", sequential=False).sequential  # asked for, not overridden
    assert not PruneConfig(preset="best", quantize="fp8").sequential and not PruneConfig(preset="fast", quantize="fp8").sequential
    assert not PruneConfig(method="sparsegpt", quantize="fp8").sequential


def test_a_selection_that_skips_layers_or_groups(tiny_llama_dir):
    """Layers with nothing selected pass through; a selection without q/k/v starts at o_proj's group."""
    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 2, 32)
    selection = LayerSelection(include=("*.layers.0.self_attn.o_proj", "*.layers.0.mlp.*"))
    reports = driver.prune_model_(model, samples, PruneConfig(preset="fast", sequential=True), "cpu",
                                  selection=selection)
    assert [r["name"].rsplit(".", 2)[-2:] for r in reports] == [
        ["self_attn", "o_proj"], ["mlp", "gate_proj"], ["mlp", "up_proj"], ["mlp", "down_proj"]]
    for mod in prunable_linears(model, selection)[0].values():
        assert_nm(mod.weight, 2, 4)


@pytest.mark.parametrize("options, first_pass", [(dict(preset="default", quantize="fp8"), 1),
                                                   (dict(preset="fast", sequential=True), 1),
                                                   (dict(preset="default", quantize="int8"), 4)],
                         ids=["fp8 per group", "no permutations", "int8 permuted on the first pass"])
def test_the_first_pass_gathers_only_what_is_read_of_it(tiny_llama_dir, monkeypatch, options, first_pass):
    """Sequentially, each later group gathers its own statistics, so the first pass accumulates only
    q/k/v's input (one Hessian per group and layer, as in one pass), unless the permutations are
    chosen on it (the 8-bit step at the layer's end): then it gathers every input's."""
    made = []

    class Counted(driver.HessianAccumulator):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(driver, "HessianAccumulator", Counted)
    config = PruneConfig(**options)
    assert config.recipe.solve.sequential
    model, _, _, _ = solved_hessians(monkeypatch, tiny_llama_dir, config)
    assert len(made) == (len(GROUPS) - 1 + first_pass) * len(model.model.layers)


def recorded_permutations(monkeypatch):
    """{consumer: (its Hessian as the permutation read it, the same tensor once reordered)}, layer 0."""
    import thanos.recipe as recipe
    given = {}
    apply = recipe.permute_free_channels_

    def recording(layer, prefix, layout, hessian_of, *args, **kwargs):
        for spec in layout.free:
            hessian = hessian_of(prefix + spec.consumer)
            if hessian is not None and prefix.endswith("layers.0."):
                given[prefix + spec.consumer] = (hessian.clone(), hessian)  # reordered in place after
        return apply(layer, prefix, layout, hessian_of, *args, **kwargs)

    monkeypatch.setattr(recipe, "permute_free_channels_", recording)
    return given


def test_permutations_are_chosen_from_each_groups_own_statistics(tiny_llama_dir, monkeypatch):
    """o_proj's and down_proj's channels are reordered from the statistics of their group's pass
    (v_proj and gate/up pruned and 8-bit by then), the very Hessian then solved on; the producers'
    8-bit row scales move with their rows, so every weight is still its 8-bit values times its scale."""
    given = recorded_permutations(monkeypatch)
    config = PruneConfig(preset="default", quantize="fp8")
    assert config.recipe.solve.sequential
    model, _, seen, reports = solved_hessians(monkeypatch, tiny_llama_dir, config)
    moved = {r["name"]: r["permutation"]["moved"] for r in reports if r.get("permutation")}
    assert {name.rsplit(".", 1)[-1] for name in given} == {"o_proj", "down_proj"}
    for name, (_, hessian) in given.items():
        assert torch.equal(hessian, seen[name]) and moved[name] > 0, name
    from thanos.quantize import FORMATS, grid_of
    for layer in prunable_linears(model, LayerSelection()).values():
        for name, mod in layer.items():
            assert grid_of(mod.weight, quantization_of(mod).weight_scale, FORMATS["fp8"]) is not None, name


def test_with_the_8bit_step_at_the_layers_end_permutations_read_the_first_pass(tiny_llama_dir, monkeypatch):
    """INT8 (smoothed, so quantized at the layer's end): o_proj's and down_proj's orders come from the
    dense layer's statistics, as in one pass (round 8's choice: better there over 5 seeds)."""
    model, tokenizer = load_model(str(tiny_llama_dir))
    samples = sample_windows(tokenize_split(tokenizer, None).calibration, 4, 32)
    captured = driver.capture_layer_inputs(model, samples, torch.device("cpu"), torch.device("cpu"))
    dense = layer_hessians(model.model.layers[0], prunable_linears(model, LayerSelection())[0], captured)
    given = recorded_permutations(monkeypatch)
    model, _, seen, _ = solved_hessians(monkeypatch, tiny_llama_dir, PruneConfig(preset="default", quantize="int8"))
    assert {name.rsplit(".", 1)[-1] for name in given} == {"o_proj", "down_proj"}
    for name, (read, _) in given.items():
        assert torch.equal(read, dense[name]), name
