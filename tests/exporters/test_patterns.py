import pytest
import torch

from exporters.patterns import NotHardwareSparseError, analyse, require_hardware_2to4


def test_known_patterns_on_hand_made_tensors():
    two_four = torch.tensor([[1.0, 0, 2, 0, 0, 3, 4, 0] * 4] * 16)  # (16, 32)
    info = analyse("a", two_four)
    assert info.pattern == "2:4" and info.hardware_2to4 and info.sparsity == 0.5
    assert "once cast" in info.reason  # fp32 storage
    for dtype, named in ((torch.int8, "INT8: compute capability 8.0+"), (torch.float8_e4m3fn, "FP8: compute "
                                                                                          "capability 8.9+")):
        info = analyse("q", two_four.to(dtype))  # an 8-bit export's weights run as they are stored
        assert info.hardware_2to4 and info.reason == f"2:4 in 8 bits ({named})"

    four_eight = torch.tensor([[1.0, 2, 3, 4, 0, 0, 0, 0] * 4] * 16)  # 4:8 but groups of 4 are dense
    info = analyse("b", four_eight.half())
    assert info.pattern == "4:8" and not info.hardware_2to4 and "not 2:4" in info.reason

    dense = torch.ones(16, 32)
    assert analyse("c", dense).pattern is None and analyse("c", dense).sparsity == 0.0

    odd_shape = torch.tensor([[1.0, 0, 2, 0] * 3] * 16)  # 12 columns: not a multiple of 16
    info = analyse("d", odd_shape.half())
    assert info.pattern == "2:4" and not info.hardware_2to4 and "multiple of 16x16" in info.reason


def test_negative_zero_counts_as_a_value():
    w = torch.tensor([[-0.0, 1.0, 2.0, 0.0] * 4] * 16)
    assert analyse("z", w).pattern is None  # three stored values in a group of four


def test_refusals_explain_why_and_what_to_do():
    layers = [analyse("l", torch.tensor([[1.0, 2, 3, 4, 0, 0, 0, 0] * 4] * 16))]
    with pytest.raises(NotHardwareSparseError, match="pattern 4:8.*--allow-dense.*--target safetensors"):
        require_hardware_2to4(layers, {"config": {"pattern": "4:8", "alpha": 0.0}}, "TensorRT")
    with pytest.raises(NotHardwareSparseError, match="alpha=0.1 kept outlier rows dense"):
        require_hardware_2to4(None, {"config": {"pattern": "2:4", "alpha": 0.1}}, "TensorRT")
    ok = [analyse("l", torch.tensor([[1.0, 0, 2, 0] * 8] * 16))]
    require_hardware_2to4(ok, {"config": {"pattern": "2:4", "alpha": 0.0}}, "TensorRT")


@pytest.mark.parametrize("fixture", ["pruned_llama_2of4", "pruned_gpt2_2of4"])
def test_lazy_directory_inspection_equals_loading_the_model(request, fixture):
    from exporters.source import directory_patterns, load_pruned, model_patterns

    path = request.getfixturevalue(fixture)
    lazy = [l.to_json() for l in directory_patterns(path)]
    loaded = [l.to_json() for l in model_patterns(load_pruned(path)[0])]
    assert lazy == loaded and len(lazy) in (8, 21)
    assert all(l["pattern"] == "2:4" for l in lazy)
