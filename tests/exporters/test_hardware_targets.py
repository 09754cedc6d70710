import pytest
import torch

from exporters import BackendMissingError, ExportOptions, export
from exporters.patterns import NotHardwareSparseError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU exists")


@no_gpu
def test_torch_target_without_gpu_is_a_clear_error(pruned_llama_2of4, tmp_path):
    with pytest.raises(BackendMissingError, match="needs a CUDA GPU.*--target onnx"):
        export("torch", pruned_llama_2of4, tmp_path)


@no_gpu
def test_tensorrt_target_without_tensorrt_fails_before_the_onnx_work(pruned_llama_2of4, tmp_path, monkeypatch):
    from exporters import tensorrt_engine

    def never(*args, **kwargs):
        raise AssertionError("the ONNX export ran before the TensorRT check")

    monkeypatch.setattr(tensorrt_engine, "export_onnx", never)
    with pytest.raises(BackendMissingError, match="--target onnx"):
        export("tensorrt", pruned_llama_2of4, tmp_path / "engine", ExportOptions(dtype="float32"))
    assert not (tmp_path / "engine").exists() and not list(tmp_path.iterdir())


def test_tensorrt_refuses_4of8(pruned_llama_4of8, tmp_path):
    with pytest.raises(NotHardwareSparseError, match="pattern 4:8.*--allow-dense"):
        export("tensorrt", pruned_llama_4of8, tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_engine_precision_follows_the_tensorrt_release():
    """TensorRT 10 takes precision flags over the float16 graph; 11 has none (strongly typed), so a
    bfloat16 engine, which would need a bfloat16 graph, is refused instead of built in float16."""
    from exporters import ExportError
    from exporters.tensorrt_engine import precision_flags

    assert precision_flags("10.13.3.9", "bfloat16", None) == ["BF16"]
    assert precision_flags("10.13.3.9", "float16", "int8") == ["FP16", "INT8"]
    assert precision_flags("10.0.1", "float32", "fp8") == ["FP8"]
    assert precision_flags("11.4.0", "float16", "fp8") == [] and precision_flags("11.0.0", None, None) == []
    with pytest.raises(ExportError, match=r"TensorRT 11\.4\.0 builds an engine in the ONNX graph's own types.*"
                                          r"use --dtype float16"):
        precision_flags("11.4.0", "bfloat16", None)


def test_sparsity_log_parsing():
    from exporters.tensorrt_engine import parse_sparsity_log

    lines = ["[V] (Sparsity) Layers eligible for sparse math: /m/q/MatMul, /m/k/MatMul",
             "[V] (Sparsity) TRT inference plan picked sparse implementation for layers: /m/q/MatMul",
             "unrelated"]
    assert parse_sparsity_log(lines) == {"eligible": ["/m/q/MatMul", "/m/k/MatMul"],
                                         "sparse_implementation": ["/m/q/MatMul"]}


@pytest.mark.gpu
def test_semi_structured_matches_dense_pruned_model(pruned_llama_2of4, tmp_path):
    # needs: CUDA capability 8.0+; the tiny model's 64-wide linears meet cuSPARSELt's 16x16 constraint
    summary = export("torch", pruned_llama_2of4, tmp_path, ExportOptions(dtype="float16"))
    assert len(summary["converted"]) == 21
    assert summary["validation"]["max_abs_diff"] <= summary["validation"]["tolerance"]


@pytest.mark.gpu
def test_tensorrt_engine_has_sparse_layers(pruned_llama_2of4, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this GPU machine")
    summary = export("tensorrt", pruned_llama_2of4, tmp_path, ExportOptions(dtype="float16", seqlen=(1, 16, 64)))
    assert (tmp_path / "model.engine").stat().st_size > 0
    assert (tmp_path / "tensorrt_build.log").is_file()
    assert summary["sparse_weights"] is True
    assert summary["eligible"], "TensorRT named no layer eligible for sparse math"
    check = summary["engine_check"]  # the engine itself ran the check prompts
    assert check["tokens"] > 0 and 0 <= check["max_abs_diff"] and check["top_token_agrees"] > 0.5, check


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_torch_target_runs_a_mixture_of_experts_on_sparse_kernels(quantize, tmp_path, tmp_path_factory,
                                                                       tiny_tokenizer_dir):
    # needs: CUDA capability 8.0+; each expert's linear runs on the few tokens routed to it (the kernels
    # pad them), and an expert none is routed to is not called
    from exporters.torch_sparse import load_semi_structured
    from tests.conftest import _save_tiny
    from thanos.config import PruneConfig
    from thanos.pipeline import PruneJob, prune_to_directory

    pruned = tmp_path / "p"
    prune_to_directory(PruneJob(out=str(pruned), model=str(_save_tiny("olmoe", tmp_path_factory, tiny_tokenizer_dir)),
                                config=PruneConfig(pattern="2:4", quantize=quantize), calib_samples=4, seqlen=32,
                                evaluate=False, device="cuda"))
    summary = export("torch", pruned, tmp_path / "t", ExportOptions(dtype="float16"))
    assert len(summary["converted"]) == 2 * (4 + 4 * 3)
    model, report = load_semi_structured(tmp_path / "t")
    with torch.no_grad():
        logits = model(torch.tensor([[5]], device="cuda"), use_cache=False).logits  # one token: two experts idle
    assert torch.isfinite(logits).all() and len(report.converted) == len(summary["converted"])


@pytest.mark.parametrize("family", ["lfm2", "nemotron_h", "granitemoehybrid", "falcon_h1"])
def test_hybrids_with_a_recurrent_state_are_refused_by_the_graph_targets(family, tmp_path):
    """Mamba-2 and short-convolution layers keep a state the graphs' KV cache does not hold: refused from
    the config object and from config.json as saved (Nemotron-H names its layer kinds otherwise)."""
    import json

    from exporters import untraceable
    from tests.conftest import tiny_config

    config = tiny_config(family)
    config.save_pretrained(tmp_path)
    for form in (config, json.loads((tmp_path / "config.json").read_text())):
        assert "Mamba or convolution layers" in untraceable(form)
    if family == "nemotron_h":  # as NVIDIA's releases spell their layers: M Mamba, - MLP, * attention
        assert "Mamba or convolution layers" in untraceable(dict(model_type=family, hybrid_override_pattern="M-M*-"))
        assert untraceable(dict(model_type=family, hybrid_override_pattern="*-*-")) is None
