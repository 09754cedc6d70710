import pytest

from thanos import ConfigError, Pattern, PruneConfig


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
    with pytest.raises(ConfigError, match="damp must be positive"):
        PruneConfig(damp=0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        PruneConfig(pattern="unstructured", sparsity=1.0)


def test_config_serialises_resolved_values():
    data = PruneConfig(pattern="unstructured", sparsity=0.6).to_json()
    assert data == {"method": "thanos", "pattern": "unstructured", "sparsity": 0.6,
                    "block_size": 128, "alpha": 0.0, "damp": 0.01}
