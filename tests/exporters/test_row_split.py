import pytest
import torch
from torch import nn

from exporters.row_split import ROW_MULTIPLE, RowSplitLinear, split_dense_rows_, two_four_rows
from runtime_bench.gemm import two_four_weight

EPS = torch.finfo(torch.float32).eps


def outlier_weight(rows=100, cols=64, dense=(3, 40, 41, 99)):
    w = two_four_weight(rows, cols, torch.float32, "cpu")
    w[list(dense)] = torch.randn(len(dense), cols)
    return w


def test_two_four_rows_finds_the_dense_ones():
    sparse = two_four_rows(outlier_weight())
    assert (~sparse).nonzero().flatten().tolist() == [3, 40, 41, 99]


@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_equals_the_original(bias):
    linear = nn.Linear(64, 100, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(outlier_weight())
    split = RowSplitLinear(linear.weight, linear.bias, two_four_rows(linear.weight))
    x = torch.randn(2, 5, 64)
    # fp32 round-off of a 64-term dot product, scaled by the terms' magnitudes (BLAS kernels differ by CPU)
    with torch.no_grad():
        magnitude = (x.abs() @ linear.weight.abs().T).max() + (linear.bias.abs().max() if bias else 0)
    tolerance = 2 * 64 * EPS * float(magnitude)
    torch.testing.assert_close(split(x), linear(x), rtol=0, atol=tolerance)
    assert two_four_rows(split.sparse_rows.weight).all() and split.dense_rows.weight.shape[0] == 4


def test_split_model_keeps_its_logits_and_rounds_the_sparse_rows(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.copy_(outlier_weight(128, 64, dense=(0, 7)))  # 126 rows 2:4
        model.model.layers[0].self_attn.q_proj.weight.copy_(two_four_weight(64, 64, torch.float32, "cpu"))
    ids = torch.randint(0, 50, (2, 9))
    expected = model(ids).logits
    done = split_dense_rows_(model)
    assert list(done) == ["model.layers.0.mlp.up_proj"]  # q_proj is 2:4 everywhere, the rest is dense
    assert done["model.layers.0.mlp.up_proj"] == dict(sparse_rows=96, dense_rows=32, outlier_rows=2)
    assert done["model.layers.0.mlp.up_proj"]["sparse_rows"] % ROW_MULTIPLE == 0
    # round-off of hidden-size dot products through the layer and the head, scaled by the logits
    tolerance = 4 * config.hidden_size * EPS * float(expected.detach().abs().max())
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=tolerance)


def test_hardware_targets_refuse_outlier_rows_and_name_the_split(pruned_with_outliers, tmp_path):
    from exporters import ExportOptions, export
    from exporters.patterns import NotHardwareSparseError

    with pytest.raises(NotHardwareSparseError, match="--split-dense-rows"):
        export("tensorrt", pruned_with_outliers, tmp_path, ExportOptions(dtype="float32"))


@pytest.mark.onnx
def test_split_onnx_keeps_2of4_in_the_sparse_parts(pruned_with_outliers, tmp_path):
    from exporters import ExportOptions, export
    from exporters.onnx_export import onnx_weight_patterns

    summary = export("onnx", pruned_with_outliers, tmp_path, ExportOptions(dtype="float32", split_dense_rows=True))
    assert summary["validation"]["max_abs_diff"] <= summary["validation"]["tolerance"]  # onnxruntime vs PyTorch
    split = summary["split_rows"]
    assert {n.rsplit(".", 1)[-1] for n, r in split.items() if r["sparse_rows"]} == {
        "q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(r["sparse_rows"] == 0 for n, r in split.items() if n.endswith(("k_proj", "v_proj")))  # 31 rows 2:4
    patterns = [l for l in onnx_weight_patterns(tmp_path / "model.onnx") if l.pattern == "2:4"]
    assert len(patterns) == 3 * 5 and all(l.hardware_2to4 for l in patterns)  # the sparse part of each split


def test_tensorrt_target_accepts_the_split(pruned_with_outliers, tmp_path):
    import importlib.util

    from exporters import BackendMissingError, ExportOptions, export

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the GPU test covers the build")
    with pytest.raises(BackendMissingError, match="TensorRT"):  # past the 2:4 check: the split was accepted
        export("tensorrt", pruned_with_outliers, tmp_path / "e", ExportOptions(dtype="float32", split_dense_rows=True))
    assert not (tmp_path / "e").exists()  # refused before any ONNX work


@pytest.mark.gpu
def test_gpu_torch_target_runs_the_split_on_sparse_kernels(pruned_with_outliers, tmp_path):
    from exporters import ExportOptions, export

    summary = export("torch", pruned_with_outliers, tmp_path, ExportOptions(dtype="float16", split_dense_rows=True))
    assert len(summary["converted"]) == 15 and all(n.endswith(".sparse_rows") for n in summary["converted"])
    assert summary["validation"]["max_abs_diff"] <= summary["validation"]["tolerance"]


def test_the_gemm_benchmarks_split_layer_computes_the_same_product():
    from runtime_bench.gemm import OUTLIER_ROWS, _split_linear

    w = two_four_weight(200, 64, torch.float32, "cpu")
    split = _split_linear(w, lambda t: t)  # the dense stand-in for the semi-structured conversion
    dense_rows = split.dense_rows.weight.shape[0]
    assert split.sparse_rows.weight.shape[0] == 160 and dense_rows == 40  # 10 outlier rows + 30 to round
    assert round(OUTLIER_ROWS * 200) == 10
    x = torch.randn(7, 64)
    w_used = torch.empty_like(w)
    w_used[split.order.argsort()] = torch.cat([split.sparse_rows.weight, split.dense_rows.weight])
    torch.testing.assert_close(split(x), x @ w_used.T)
