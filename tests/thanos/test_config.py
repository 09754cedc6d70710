import pytest

from thanos import ConfigError, Pattern, PruneConfig
from thanos.config import PRESETS


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
                    "refit_iterations": preset.refit_iterations,
                    "mask_search_iterations": preset.mask_search_iterations,
                    "reconstruct_epochs": preset.reconstruct_epochs,
                    "reconstruct_lr": preset.reconstruct_lr, "reconstruct_target": "layer", "preset": "default",
                    "permute_channels": False}  # unstructured has no groups to permute
    assert PruneConfig(pattern="2:4").to_json()["permute_channels"] == preset.permute_channels


def test_presets_fill_only_what_is_not_given():
    best = PruneConfig(preset="best")
    assert best.refit_iterations == PRESETS["best"].refit_iterations
    assert best.reconstruct_epochs == PRESETS["best"].reconstruct_epochs
    assert best.resolved_block_size == PRESETS["best"].block_size["nm"]
    assert PruneConfig(preset="best", refit_iterations=0, block_size=32).to_json()["refit_iterations"] == 0
    assert PruneConfig(preset="best", block_size=32).resolved_block_size == 32
    assert PruneConfig(method="sparsegpt", preset="best").refit_iterations == 0  # presets are Thanos settings
    with pytest.raises(ConfigError, match="choose one of fast, default, best"):
        PruneConfig(preset="fastest")
    with pytest.raises(ConfigError, match="refit_iterations"):
        PruneConfig(refit_iterations=-1)
