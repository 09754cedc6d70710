import json

import pytest

from thanos import ConfigError, Pattern, PruneConfig
from thanos.config import DEFAULT_BLOCK_SIZE, PRESETS, REFIT_TOLERANCE
from thanos.recipe import Recipe, Reconstruct, Refit


def test_pattern_parsing():
    assert Pattern.parse("2:4") == Pattern("nm", 2, 4)
    assert Pattern.parse(" 4 : 8 ") == Pattern("nm", 4, 8)
    assert Pattern.parse("unstructured").kind == "unstructured"
    assert Pattern.parse("Columns").kind == "columns"
    assert str(Pattern.parse("2:4")) == "2:4"


@pytest.mark.parametrize("text, fragment", [
    ("3:2", "0 < n < m"),
    ("4:4", "0 < n < m"),
    ("two:four", "use 'unstructured'"),
])
def test_bad_patterns_name_the_fix(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Pattern.parse(text)


def test_nm_fixes_sparsity():
    assert PruneConfig(pattern="2:4").sparsity == 0.5
    assert PruneConfig(pattern="1:4").sparsity == 0.25
    with pytest.raises(ConfigError, match="omit sparsity or pass 0.5"):
        PruneConfig(pattern="2:4", sparsity=0.3)


def test_block_size_must_be_multiple_of_m():
    with pytest.raises(ConfigError, match="use 128 or 136"):
        PruneConfig(pattern="4:8", block_size=130)
    assert PruneConfig(pattern="4:8", block_size=136).resolved_block_size == 136


def test_other_bad_settings():
    with pytest.raises(ConfigError, match="choose one of"):
        PruneConfig(method="obc")
    with pytest.raises(ConfigError, match="Thanos option"):
        PruneConfig(method="wanda", alpha=0.1)
    with pytest.raises(ConfigError, match="damp must be a positive finite number"):
        PruneConfig(damp=0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        PruneConfig(pattern="unstructured", sparsity=1.0)


def test_config_serialises_resolved_values():
    data = PruneConfig(pattern="unstructured", sparsity=0.6).to_json()
    preset = PRESETS["default"]
    assert data == {"method": "thanos", "pattern": "unstructured", "sparsity": 0.6,
                    "block_size": preset.block_size["unstructured"], "alpha": 0.0, "damp": 0.01,
                    "refit_iterations": preset.refit_iterations, "refit_tolerance": preset.refit_tolerance,
                    "mask_search_iterations": preset.mask_search_iterations,
                    "reconstruct_epochs": preset.reconstruct_epochs,
                    "reconstruct_lr": preset.reconstruct_lr, "reconstruct_target": "layer", "preset": "default",
                    "permute_channels": False,  # unstructured has no groups to permute
                    "sequential": False}  # the preset's group-by-group solves come with the 8-bit step
    assert PruneConfig(pattern="2:4").to_json()["permute_channels"] == preset.permute_channels


def test_presets_fill_only_what_is_not_given():
    best = PruneConfig(preset="best")
    assert best.refit_iterations == PRESETS["best"].refit_iterations
    assert best.reconstruct_epochs == PRESETS["best"].reconstruct_epochs
    assert best.resolved_block_size == PRESETS["best"].block_size["nm"]
    assert PruneConfig(preset="best", refit_iterations=0, block_size=32).to_json()["refit_iterations"] == 0
    assert PruneConfig(preset="best", block_size=32).resolved_block_size == 32
    assert PruneConfig(method="sparsegpt").refit_iterations == 0  # presets are Thanos recipes
    with pytest.raises(ConfigError, match="choose one of fast, default, best"):
        PruneConfig(preset="fastest")
    with pytest.raises(ConfigError, match="refit_iterations"):
        PruneConfig(refit_iterations=-1)


def test_options_a_recipe_would_not_use_are_refused():
    """A preset for another method, a reconstruction target without reconstruction, a search on columns:
    each names the reason, none is silently ignored."""
    with pytest.raises(ConfigError, match="presets are Thanos recipes"):
        PruneConfig(method="sparsegpt", preset="best")
    for field, value in (("reconstruct_target", "dense"), ("reconstruct_lr", 1e-4)):
        with pytest.raises(ConfigError, match=f"{field} applies to the reconstruction"):
            PruneConfig(**{field: value})
    assert PruneConfig(preset="best", reconstruct_target="dense").recipe.get(Reconstruct).target == "dense"
    with pytest.raises(ConfigError, match="refit_tolerance applies to the refit"):
        PruneConfig(preset="fast", refit_tolerance=1e-3)
    with pytest.raises(ConfigError, match="refit tolerance must be in"):
        PruneConfig(refit_tolerance=1.5)
    with pytest.raises(ConfigError, match="'columns' pattern"):
        PruneConfig(pattern="columns", mask_search_iterations=5)
    with pytest.raises(ConfigError, match="no groups"):
        PruneConfig(pattern="unstructured", permute_channels=True)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured", "columns"])
def test_presets_are_named_recipes_of_configured_steps(pattern):
    kinds = {name: [step.kind for step in PruneConfig(pattern=pattern, preset=name).recipe.steps]
             for name in PRESETS}
    assert kinds["fast"] == ["solve"]
    permute = ["permute"] if pattern in ("2:4", "4:8") else []
    search = [] if pattern == "columns" else ["mask_search"]
    assert kinds["default"] == permute + ["solve"] + search + ["refit"]
    assert kinds["best"] == permute + ["solve"] + search + ["refit", "reconstruct"]
    # the default's refit ends once it stops paying; best's runs every iteration (ALGORITHM.md section 8)
    assert PruneConfig(pattern=pattern, preset="default").recipe.get(Refit).tolerance == REFIT_TOLERANCE > 0
    assert PruneConfig(pattern=pattern, preset="best").recipe.get(Refit).tolerance == 0.0
    assert PruneConfig(method="sparsegpt", pattern=pattern, refit_iterations=5).recipe.get(Refit).tolerance == 0.0
    assert PruneConfig(method="wanda", pattern=pattern).recipe.to_json()["steps"] == [
        dict(step="solve", method="wanda", block_size=DEFAULT_BLOCK_SIZE["nm" if ":" in pattern else pattern],
             alpha=0.0, damp=0.01, sequential=False)]


def test_a_recorded_recipe_rebuilds_the_same_config():
    for config in (PruneConfig(preset="best", reconstruct_target="dense"), PruneConfig(method="sparsegpt",
                   pattern="4:8", refit_iterations=3), PruneConfig(pattern="unstructured", sparsity=0.6, alpha=0.05)):
        recorded = json.loads(json.dumps(config.recipe.to_json()))
        again = PruneConfig.from_recipe(recorded)
        assert again.to_json() == config.to_json() and again.recipe == config.recipe
    assert PruneConfig.from_recipe(PruneConfig().recipe, refit_iterations=3).recipe.get(Refit).iterations == 3
    # leaving a step out by an override drops the recipe's options for it, instead of refusing them
    assert PruneConfig.from_recipe(PruneConfig().recipe, refit_iterations=0).recipe.get(Refit) is None
    assert PruneConfig.from_recipe(PruneConfig(preset="best").recipe, reconstruct_epochs=0).reconstruct_epochs == 0
    # a refit recorded before the tolerance existed ran every iteration, and still does
    older = PruneConfig().recipe.to_json()
    del next(step for step in older["steps"] if step["step"] == "refit")["tolerance"]
    assert PruneConfig.from_recipe(older).recipe.get(Refit).tolerance == 0.0
    with pytest.raises(ConfigError, match="unknown recipe step 'prune_harder'"):
        Recipe.from_json(dict(pattern="2:4", sparsity=0.5, steps=[dict(step="prune_harder")]))
    with pytest.raises(ConfigError, match="in the order"):
        Recipe.from_json(dict(pattern="2:4", sparsity=0.5, steps=[dict(step="refit", iterations=1),
                                                                   dict(step="solve")]))
